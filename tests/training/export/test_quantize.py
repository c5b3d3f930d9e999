"""Static INT8 quantisation: cifarlab.export.quantize, and scripts/quantize.py as a user runs it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cifarlab.export.onnx import export_onnx, read_metadata
from cifarlab.export.quantize import QUANTIZATION_KEY, quantize_int8
from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.model import contract_metadata
from serve.model import load_model
from serve.settings import Settings
from tests.conftest import ROOT, run_cli
from tests.training.export.test_onnx import random_images, tiny_net

pytestmark = pytest.mark.slow  # calibrates and scores INT8 models

# An x86 CPU with AVX2 and without AVX-512 or VNNI, emulated (Debian's qemu-user): there ONNX Runtime multiplies
# uint8 by int8 with the saturating instruction that VNNI CPUs do without.
AVX2_ONLY_CPU = ["qemu-x86_64", "-cpu", "Haswell,-hle,-rtm,-invpcid,-tsc-deadline"]  # minus what TCG cannot emulate
# Run there: the CPU features numpy reads with CPUID, and the model's logits from ONNX Runtime's CPU provider (the
# server's own loader imports scipy, a minute under emulation; its session options set only threads and spinning).
SERVE_ON_THAT_CPU = """
import json, sys
import numpy as np
import onnxruntime as ort
from numpy._core._multiarray_umath import __cpu_features__
model, images, logits = sys.argv[1:]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
np.save(logits, session.run(["logits"], {"images": np.load(images)})[0])
print(json.dumps({name: __cpu_features__[name] for name in ("AVX2", "AVX512F", "AVX512VNNI")}))
"""


def logits_on_an_avx2_only_cpu(model: Path, images: np.ndarray, folder: Path) -> np.ndarray:
    if shutil.which(AVX2_ONLY_CPU[0]) is None:
        pytest.fail("qemu-x86_64 is missing: make system-deps (or apt-get install qemu-user)")
    np.save(folder / "images.npy", images)
    command = [*AVX2_ONLY_CPU, sys.executable, "-c", SERVE_ON_THAT_CPU, str(model), str(folder / "images.npy")]
    result = subprocess.run(
        [*command, str(folder / "logits.npy")], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    features = json.loads(result.stdout.splitlines()[-1])
    assert features == {"AVX2": True, "AVX512F": False, "AVX512VNNI": False}, "not the CPU the test needs"
    return np.load(folder / "logits.npy")


def fp32_model(folder: Path) -> Path:
    return export_onnx(tiny_net(), folder / "model.onnx", contract_metadata(CIFAR10_CLASSES, "run-1", "ab" * 32))


def quantize_cli(model: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/quantize.py on the committed sample, prepared beside the model (not in the repository's data/)."""
    prepared = model.parent / "prepared"
    return run_cli("scripts/quantize.py", "--model", str(model), "--prepared-root", str(prepared), *args)


def test_int8_model_keeps_the_contract_and_computes_the_same_function(tmp_path: Path) -> None:
    fp32_path = fp32_model(tmp_path)
    int8_path = quantize_int8(fp32_path, tmp_path / "model.int8.onnx", random_images(64, seed=1))

    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in onnx.load(str(int8_path)).graph.node}
    metadata = read_metadata(int8_path)
    assert {key: metadata[key] for key in read_metadata(fp32_path)} == read_metadata(fp32_path)
    assert metadata[QUANTIZATION_KEY] == "static int8 QDQ, 7-bit weights, 64 images"
    settings = Settings(model_uri=str(fp32_path))
    fp32, int8 = load_model(str(fp32_path), settings), load_model(str(int8_path), settings)  # the server takes it
    assert int8.classes == fp32.classes == tuple(CIFAR10_CLASSES) and int8.run_id == "run-1"

    images = random_images(32, seed=2)
    expected, got = fp32.logits(images), int8.logits(images)
    assert got.shape == expected.shape and np.isfinite(got).all()
    assert 0 < np.abs(got - expected).max() < 0.25 * np.abs(expected).max()  # quantised, yet the same function
    # and the same on a CPU without VNNI, where 8-bit weights gave |int8 - fp32| = 0.333 against a bound of 0.265
    elsewhere = logits_on_an_avx2_only_cpu(int8_path, images, tmp_path)
    np.testing.assert_allclose(elsewhere, got, atol=1e-5)


def test_script_writes_the_int8_model_beside_the_fp32_one(tmp_path: Path) -> None:
    model = fp32_model(tmp_path)
    result = quantize_cli(model, "--calibration", "100", "--max-loss", "100")
    assert result.returncode == 0, result.stderr
    assert "test accuracy on 1000 images: fp32" in result.stdout
    assert read_metadata(tmp_path / "model.int8.onnx")[QUANTIZATION_KEY] == "static int8 QDQ, 7-bit weights, 100 images"


def test_script_writes_nothing_when_int8_loses_too_much(tmp_path: Path) -> None:
    model = fp32_model(tmp_path)
    # a negative allowance demands a gain, which quantisation cannot promise: refused
    result = quantize_cli(model, "--calibration", "50", "--max-loss=-100")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].endswith("(--max-loss -100.0): not written")
    assert not (tmp_path / "model.int8.onnx").exists()


def test_script_refuses_what_is_not_an_export_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    for model, message in ((tmp_path / "nope.onnx", "no model at"), (tmp_path / "junk.onnx", "is not an ONNX model")):
        result = quantize_cli(model)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junk.onnx"]
