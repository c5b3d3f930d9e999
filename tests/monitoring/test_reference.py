"""The training side of drift detection: reference statistics of an exported model, written beside it."""

import json
from pathlib import Path

import numpy as np

from cifarlab.data.prepare import CIFAR10_CLASSES
from cifarlab.export.onnx import contract_metadata, export_onnx, onnx_logits, onnx_session
from cifarlab.export.reference import file_sha256, softmax, write_reference
from serve.drift import CONTINUOUS, Reference, image_statistics
from tests.export.test_onnx import random_images, tiny_net


def test_reference_is_the_exported_models_statistics(tmp_path: Path) -> None:
    model = export_onnx(tiny_net(), tmp_path / "model.onnx", contract_metadata(CIFAR10_CLASSES, "run-7", "cd" * 32))
    images = random_images(300, seed=3)
    path = write_reference(model, images, sample_size=100)

    assert path == tmp_path / "reference.json"
    reference = Reference.load(path)
    assert reference.classes == CIFAR10_CLASSES and reference.images == 300
    assert reference.provenance == {
        "run_id": "run-7",
        "model_sha256": file_sha256(model),
        "data_manifest_sha256": "cd" * 32,
    }
    probabilities = softmax(onnx_logits(onnx_session(model), images))
    np.testing.assert_array_equal(reference.class_counts, np.bincount(probabilities.argmax(1), minlength=10))
    confidence = probabilities.max(axis=1)
    quantiles = reference.quantiles["confidence"]
    assert quantiles[0] == np.float64(round(confidence.min(), 6)) and quantiles[-1] == round(confidence.max(), 6)
    assert quantiles[50] == round(np.median(confidence), 6)
    # the sample rows are real images' statistics, computed by the serving side's own function
    brightness = image_statistics(images)["brightness"]
    assert reference.sample.shape == (100, len(CONTINUOUS))
    column = reference.sample[:, CONTINUOUS.index("brightness")]
    assert np.isin(column, np.round(brightness, 6)).all()
    assert json.loads(path.read_text())["format_version"] == 1
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write left no temp file
