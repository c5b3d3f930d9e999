"""benchmarks/serving/int8.py: the quantised model keeps the model contract and serves like the fp32 one."""

from pathlib import Path

import numpy as np
import onnx

from benchmarks.serving.int8 import quantize
from cifarlab.data.prepare import CIFAR10_CLASSES
from cifarlab.export.onnx import contract_metadata, export_onnx
from serve.model import load_model
from serve.settings import Settings
from tests.export.test_onnx import random_images, tiny_net


def test_int8_model_keeps_the_contract_and_predicts_close_to_fp32(tmp_path: Path) -> None:
    fp32_path = export_onnx(tiny_net(), tmp_path / "model.onnx", contract_metadata(CIFAR10_CLASSES, "run-1", "ab" * 32))
    int8_path = quantize(fp32_path, tmp_path / "model.int8.onnx", random_images(64, seed=1))

    graph = onnx.load(str(int8_path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    settings = Settings(model_uri=str(fp32_path))
    fp32, int8 = load_model(str(fp32_path), settings), load_model(str(int8_path), settings)
    assert int8.classes == fp32.classes == tuple(CIFAR10_CLASSES) and int8.run_id == fp32.run_id == "run-1"

    images = random_images(32, seed=2)
    expected, got = fp32.logits(images), int8.logits(images)
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert np.abs(got - expected).max() < 0.25 * np.abs(expected).max()  # quantised, not another function
