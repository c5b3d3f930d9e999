"""The model contract (docs/model-contract.md) as the exporter writes it and as ONNX Runtime reads it."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cifarlab.callbacks.onnx_export import OnnxExport
from cifarlab.errors import ExportError
from cifarlab.export.onnx import OPSET, export_onnx, preload_exporter, read_metadata, verify_onnx
from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.module import ClassifierNet
from cifarlab.runtime import user_errors_exit
from cifarlab.train import train
from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.errors import UserError
from cifarlab_contract.model import contract_metadata
from tests.conftest import TINY

MANIFEST_SHA = "ab" * 32


def tiny_net(flip_tta: bool = False) -> ClassifierNet:
    torch.manual_seed(0)
    # logit_scale 1: logits of order one, so that a wrong graph shows in the softmax, not only in the 5th digit
    return ClassifierNet(AirbenchNet(widths=(8, 16, 16), logit_scale=1.0), flip_tta=flip_tta).eval()


def random_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_logits(net: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(images)).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny network exported once under the contract: (net, path, metadata)."""
    net = tiny_net()
    metadata = contract_metadata(CIFAR10_CLASSES, "run-0123", MANIFEST_SHA, checkpoint="best.ckpt")
    path = export_onnx(net, tmp_path_factory.mktemp("onnx") / "model.onnx", metadata)
    return net, path, metadata


def test_input_is_uint8_nhwc_images_with_a_dynamic_batch(exported):
    _, path, _ = exported
    (input_,), (output,) = session(path).get_inputs(), session(path).get_outputs()
    assert (input_.name, input_.type, input_.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert (output.name, output.type, output.shape[1:]) == ("logits", "tensor(float)", [10])
    assert isinstance(input_.shape[0], str) and output.shape[0] == input_.shape[0]  # one symbolic batch axis


@pytest.mark.parametrize("batch", [1, 7])
def test_any_batch_size_gives_float_logits_matching_pytorch(exported, batch):
    net, path, _ = exported
    images = random_images(batch)
    (logits,) = session(path).run(["logits"], {"images": images})
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    expected = torch_logits(net, images)
    assert np.abs(logits - expected).max() <= 1e-4
    assert np.abs(softmax(logits) - softmax(expected)).max() <= 1e-4
    assert softmax(expected).max() - softmax(expected).min() > 0.01  # the comparison is not between constants


def test_batch_rows_are_independent(exported):
    _, path, _ = exported
    images = random_images(7)
    together = session(path).run(["logits"], {"images": images})[0]
    alone = np.concatenate([session(path).run(["logits"], {"images": images[i : i + 1]})[0] for i in range(7)])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_flip_and_translate_tta_are_inside_the_graph(tmp_path):
    net = tiny_net(flip_tta=True)
    net.translate_tta = 1
    path = export_onnx(net, tmp_path / "model.onnx", contract_metadata(CIFAR10_CLASSES, "r", MANIFEST_SHA))
    images = random_images(5)
    logits = session(path).run(["logits"], {"images": images})[0]
    assert np.abs(softmax(logits) - softmax(torch_logits(net, images))).max() <= 1e-4
    assert verify_onnx(path, net, torch.from_numpy(images)) <= 1e-4  # the exporter's own parity check
    # the same weights with fewer views score differently: all six views are in the graph
    net.translate_tta = 0
    assert np.abs(logits - torch_logits(net, images)).max() > 1e-3
    net.flip_tta = False
    assert np.abs(logits - torch_logits(net, images)).max() > 1e-3


def test_metadata_holds_the_documented_keys(exported):
    _, path, metadata = exported
    expected_keys = {
        "contract_version",
        "classes",
        "run_id",
        "data_manifest_sha256",
        "input_spec",
        "output_spec",
        "checkpoint",
    }
    assert read_metadata(path) == metadata
    assert set(metadata) == expected_keys
    assert session(path).get_modelmeta().custom_metadata_map == metadata
    assert metadata["contract_version"] == "1"
    assert json.loads(metadata["classes"]) == list(CIFAR10_CLASSES)
    assert metadata["run_id"] == "run-0123" and metadata["data_manifest_sha256"] == MANIFEST_SHA
    assert metadata["checkpoint"] == "best.ckpt"
    assert json.loads(metadata["input_spec"]) == {
        "name": "images",
        "dtype": "uint8",
        "shape": ["N", 32, 32, 3],
        "layout": "NHWC",
        "color": "RGB",
    }
    assert json.loads(metadata["output_spec"]) == {"name": "logits", "dtype": "float32", "shape": ["N", 10]}


def test_output_spec_follows_the_number_of_classes():
    metadata = contract_metadata(["cat", "dog", "eel"], "r", MANIFEST_SHA)
    assert json.loads(metadata["output_spec"])["shape"] == ["N", 3]
    assert json.loads(metadata["classes"]) == ["cat", "dog", "eel"]


def test_opset_is_18_or_later(exported):
    _, path, _ = exported
    versions = {entry.domain: entry.version for entry in onnx.load(str(path)).opset_import}
    default = versions.get("", versions.get("ai.onnx"))
    assert default is not None and default >= 18, versions


def test_export_leaves_no_temp_files(exported):
    _, path, _ = exported
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]


def test_export_is_readable_by_other_users(exported):
    # mkstemp creates 0600 files: a server running as another user (the Docker image's) could not open them
    _, path, _ = exported
    assert path.stat().st_mode & 0o777 == 0o644


class BrokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("broken forward")


def test_failed_export_keeps_the_previous_file(exported, tmp_path):
    _, good, _ = exported
    target = tmp_path / "model.onnx"
    target.write_bytes(good.read_bytes())
    broken = BrokenNet().train()
    with pytest.raises(Exception):  # noqa: B017 - whatever the exporter raises, the old file must survive
        export_onnx(broken, target, contract_metadata(CIFAR10_CLASSES, "r", MANIFEST_SHA))
    assert target.read_bytes() == good.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    assert broken.training  # the exporter restores the module's mode


def test_failed_write_removes_the_temp_file_and_keeps_the_previous_file(exported, tmp_path, monkeypatch):
    net, good, _ = exported
    target = tmp_path / "model.onnx"
    target.write_bytes(good.read_bytes())

    def failing_save(model, name, *args, **kwargs):
        Path(name).write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(net, target, contract_metadata(CIFAR10_CLASSES, "r", MANIFEST_SHA))
    assert target.read_bytes() == good.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_verify_returns_the_small_difference_of_a_faithful_export(exported):
    net, path, _ = exported
    images = torch.from_numpy(random_images(16))
    difference = verify_onnx(path, net, images)
    assert 0.0 <= difference <= 1e-4


def perturbed(net: ClassifierNet) -> ClassifierNet:
    changed = copy.deepcopy(net)
    with torch.no_grad():
        weight = changed.backbone.groups[0].conv1.weight
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)))
    return changed


def test_verify_raises_on_an_export_that_diverges(exported):
    net, path, _ = exported
    changed = perturbed(net)
    images = torch.from_numpy(random_images(16))
    actual = softmax(session(path).run(["logits"], {"images": images.numpy()})[0])
    difference = float(np.abs(actual - softmax(torch_logits(changed, images.numpy()))).max())
    assert difference > 1e-4
    with pytest.raises(ExportError) as caught:
        verify_onnx(path, changed, images)
    message = str(caught.value)
    assert str(path) in message and f"{difference:.3g}" in message and "diverges" in message
    assert isinstance(caught.value, UserError)
    # a looser tolerance accepts the same export
    assert verify_onnx(path, changed, images, tolerance=1.0) == pytest.approx(difference, abs=1e-6)


def test_verify_keeps_the_module_mode(exported):
    net, path, _ = exported
    net.train()
    try:
        verify_onnx(path, net, torch.from_numpy(random_images(4)))
        assert net.training
    finally:
        net.eval()


def test_export_error_is_one_line_on_stderr_and_exit_status_1(exported, capsys):
    net, path, _ = exported
    changed = perturbed(net)

    @user_errors_exit
    def export_step() -> float:
        return verify_onnx(path, changed, torch.from_numpy(random_images(8)))

    with pytest.raises(SystemExit) as caught:
        export_step()
    assert caught.value.code == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: ONNX export {path} diverges from the PyTorch model")
    assert "Traceback" not in captured.err + captured.out


def test_user_errors_exit_turns_export_error_into_one_line(capsys):
    @user_errors_exit
    def task() -> None:
        raise ExportError("ONNX export m.onnx diverges: 0.5")

    with pytest.raises(SystemExit) as caught:
        task()
    assert caught.value.code == 1
    assert capsys.readouterr().err == "error: ONNX export m.onnx diverges: 0.5\n"


@pytest.mark.slow
def test_callback_exports_the_best_checkpoint_of_a_run(compose_train, monkeypatch):
    exports = []
    original = OnnxExport._export

    def recording(self, trainer, module, source):
        original(self, trainer, module, source)
        exports.append((self, source, self.difference))

    monkeypatch.setattr(OnnxExport, "_export", recording)
    cfg = compose_train(*TINY, "logger=csv", "callbacks.onnx_export.every_best=true")
    train(cfg)

    run_dir = Path(cfg.paths.output_dir)
    best = run_dir / "checkpoints" / "best.ckpt"
    assert 1 <= len(exports) <= 2  # after the first best, and again at fit end if the last epoch improved
    assert all(Path(source).resolve() == best.resolve() for _, source, _ in exports)  # never the live weights
    callback = exports[-1][0]
    assert all(instance is callback for instance, _, _ in exports)
    assert callback.path == run_dir / "model.onnx" and callback.path.is_file()
    assert callback.difference is not None and 0.0 <= callback.difference <= 1e-4
    assert callback.exported_from.startswith(f"{Path(exports[-1][1])}@")

    metadata = read_metadata(callback.path)
    assert metadata["checkpoint"] == "best.ckpt"
    assert metadata["run_id"] == cfg.run_id
    assert metadata["contract_version"] == "1"
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".model.onnx")]


def test_the_exporter_preloads_the_modules_its_first_export_imports() -> None:
    """In a fresh process: what preload_exporter imports is exactly what an export would import first, so the
    export at fit end finds it loaded (a module renamed by a torch or onnxscript upgrade fails here)."""
    script = (
        "import sys\n"
        "from cifarlab.console import quiet_console\n"
        "from cifarlab.export.onnx import EXPORTER_MODULES, preload_exporter\n"
        "quiet_console()  # as train.py: the registry's torchvision lines are filtered, anything else shows\n"
        "assert not any(name in sys.modules for name in EXPORTER_MODULES), 'loaded before the preload'\n"
        "preload_exporter().result()\n"
        "missing = [name for name in EXPORTER_MODULES if name not in sys.modules]\n"
        "assert not missing, missing\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and not result.stderr, result.stderr


def test_an_export_with_the_preloaded_registry_builds_none_and_writes_the_same_model(tmp_path, monkeypatch):
    """The registry built during training is the one the exporter uses (a torch upgrade that stops asking for it
    through from_torchlib, or asks for another opset, fails here), and the model is byte for byte the same."""
    from torch.onnx._internal.exporter import _registration

    registry = preload_exporter().result()
    metadata = contract_metadata(CIFAR10_CLASSES, "r", MANIFEST_SHA)
    fresh = export_onnx(tiny_net(), tmp_path / "fresh.onnx", metadata).read_bytes()

    def no_new_registry() -> None:
        raise AssertionError("the exporter built a registry of its own")

    monkeypatch.setattr(_registration.onnxscript_apis, "get_torchlib_ops", no_new_registry)
    reused = export_onnx(tiny_net(), tmp_path / "reused.onnx", metadata, registry).read_bytes()
    assert reused == fresh
    assert [(opset.domain, opset.version) for opset in onnx.load_from_string(reused).opset_import] == [("", OPSET)]
    with pytest.raises(AssertionError, match="built a registry"):  # the guard is live: without one, it is built
        export_onnx(tiny_net(), tmp_path / "again.onnx", metadata)
