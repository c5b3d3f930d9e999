"""The training side of drift detection: reference statistics of an exported model, written beside it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cifarlab.data.prepare import CIFAR10_CLASSES
from cifarlab.export.onnx import onnx_logits, onnx_session
from cifarlab.export.reference import file_sha256, softmax, write_reference
from serve.drift import CONTINUOUS, Reference, ReferenceError, image_statistics
from tests.export.test_onnx import random_images


def test_reference_is_the_exported_models_statistics(tiny_model: Path, tmp_path: Path) -> None:
    model = Path(shutil.copy(tiny_model, tmp_path / "model.onnx"))
    images = random_images(300, seed=3)
    path = write_reference(model, images, sample_size=100)

    assert path == tmp_path / "reference.json"
    reference = Reference.load(path, model_sha256=file_sha256(model))
    assert reference.classes == CIFAR10_CLASSES and reference.images == 300
    assert reference.provenance == {
        "run_id": "run-7",
        "model_sha256": file_sha256(model),
        "data_manifest_sha256": "cd" * 32,
    }
    probabilities = softmax(onnx_logits(onnx_session(model), images))
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
    assert json.loads(path.read_text())["format_version"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write left no temp file
    with pytest.raises(ReferenceError, match="computed for model sha256"):
        Reference.load(path, model_sha256="0" * 64)  # a reference left over from another model
