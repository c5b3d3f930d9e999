"""Fixtures shared by the monitoring tests."""

from pathlib import Path

import pytest

from cifarlab.data.prepare import CIFAR10_CLASSES
from cifarlab.export.onnx import contract_metadata, export_onnx
from tests.export.test_onnx import tiny_net


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny network exported under the model contract, once per session (export is slow)."""
    metadata = contract_metadata(CIFAR10_CLASSES, "run-7", "cd" * 32)
    return export_onnx(tiny_net(), tmp_path_factory.mktemp("tiny-model") / "model.onnx", metadata)
