"""The training side of drift detection: reference statistics of an exported model, embedded in its metadata."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab.export.reference import embed_reference
from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.drift import (
    CONTINUOUS,
    InvalidReference,
    Reference,
    build_reference,
    image_statistics,
    softmax,
)
from cifarlab_contract.model import REFERENCE_KEY
from tests.training.export.test_onnx import random_images


def test_reference_is_the_exported_models_statistics(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copy(tiny_model, tmp_path / "model.onnx"))
    images = random_images(300, seed=3)
    logits_before = onnx_logits(onnx_session(model), images)
    embedded = embed_reference(model, images, sample_size=100)

    metadata = read_metadata(model)
    reference = Reference.from_metadata(metadata, CIFAR10_CLASSES, where="model.onnx")
    assert reference is not None and reference.images == 300
    assert reference.to_json() == embedded.to_json()
    assert reference.provenance == {"run_id": "run-7", "data_manifest_sha256": "cd" * 32}
    assert json.loads(metadata["classes"]) == list(CIFAR10_CLASSES)  # the contract's metadata is kept
    probabilities = softmax(onnx_logits(onnx_session(model), images))
    np.testing.assert_array_equal(probabilities, softmax(logits_before))  # the graph is untouched
    np.testing.assert_array_equal(reference.class_counts, np.bincount(probabilities.argmax(1), minlength=10))
    confidence = probabilities.max(axis=1)
    np.testing.assert_allclose(
        reference.quantiles["confidence"][[0, 50, 100]],
        [confidence.min(), np.median(confidence), confidence.max()],
        atol=1e-6,
    )
    # the sample rows are real images' statistics, computed by the serving side's own function
    brightness = image_statistics(images)["brightness"]
    assert reference.sample.shape == (100, len(CONTINUOUS))
    column = reference.sample[:, CONTINUOUS.index("brightness")]
    assert np.abs(column[:, None] - brightness[None, :]).min(axis=1).max() < 1e-6
    assert json.loads(metadata[REFERENCE_KEY])["format_version"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write left no temp file


def test_embedding_again_replaces_the_reference(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copy(tiny_model, tmp_path / "model.onnx"))
    embed_reference(model, random_images(50, seed=1), sample_size=50)
    embed_reference(model, random_images(80, seed=2), sample_size=50)
    keys = [key for key in read_metadata(model) if key == REFERENCE_KEY]
    reference = Reference.from_metadata(read_metadata(model), CIFAR10_CLASSES, where="model.onnx")
    assert len(keys) == 1 and reference is not None and reference.images == 80


def test_a_model_without_a_reference_has_none_and_a_mismatched_one_is_an_error(tiny_model: Path) -> None:
    metadata = read_metadata(tiny_model)
    assert Reference.from_metadata(metadata, CIFAR10_CLASSES, where="m") is None
    other = build_reference(random_images(30, seed=0), np.full((30, 2), 0.5), ["a", "b"])
    with pytest.raises(InvalidReference, match="classes"):
        Reference.from_metadata({REFERENCE_KEY: other.to_json()}, CIFAR10_CLASSES, where="m")
