"""The MacBook path without a Mac: no float64 tensor and no op that MPS lacks ever reaches the training device.

MPS has no float64 (nor complex128), and an op without an MPS kernel raises there. This CPU-only torch build
cannot run MPS, so the training path runs on stand-ins for an accelerator under `AcceleratorGuard`, which fails
at the first op that touches a non-CPU tensor and either has a float64 tensor among its inputs and outputs or
has no MPS kernel in the operator table torch ships (torchgen's native_functions.yaml):

- the whitening fit, with module and images as fake tensors on an "mps" device (FakeTensorMode);
- training, validation and test steps, the Muon and SGD steps, the schedule and the lookahead average, on the
  "meta" device: fake "mps" tensors cannot run autograd (it needs the absent device's guard), meta ones can.

What a real Mac adds (Metal's numerics, kernels torch registers outside that table) is the macOS CI job's part.
"""

import functools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import torchgen
import yaml
from hydra.utils import instantiate
from torch import Tensor, nn
from torch._subclasses import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cifarlab.callbacks.lookahead import Lookahead
from cifarlab.models.module import ImageClassifier, _build

MPS_LACKS = (torch.float64, torch.complex128)
# Kernels that run on every backend: through other ops (composite) or without a kernel of their own.
ANY_BACKEND = {"CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional", "CompositeImplicitAutograd"}


@functools.cache
def _operator_table() -> dict[str, dict[str, Any]]:
    table = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    entries = yaml.load(table.read_text(), Loader=yaml.CSafeLoader)
    return {entry["func"].split("(")[0]: entry for entry in entries}


def has_mps_kernel(name: str) -> bool:
    """Whether aten operator `name` ("add.Tensor") runs on MPS, by torch's own operator table."""
    entry = _operator_table().get(name)
    if entry is None:
        return False
    if "structured_delegate" in entry:  # the functional form of a structured kernel: its out= form has them
        return has_mps_kernel(entry["structured_delegate"])
    if "dispatch" not in entry:  # no dispatch table: composite, decomposed into other ops
        return True
    keys = {key.strip() for keys in entry["dispatch"] for key in keys.split(",")}
    return "MPS" in keys or bool(keys & ANY_BACKEND)


class AcceleratorGuard(TorchDispatchMode):
    """Raise at the first op on a non-CPU tensor that MPS could not run; count the device ops it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.device_ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, Tensor)]
        if any(t.device.type != "cpu" for t in tensors):
            name = func._schema.name.removeprefix("aten::")
            name += "" if func._overloadname == "default" else f".{func._overloadname}"
            self.device_ops[name] += 1
            dtypes = sorted({str(t.dtype) for t in tensors if t.dtype in MPS_LACKS})
            devices = sorted({str(t.device) for t in tensors})
            assert not dtypes, f"{name} on {devices} with {dtypes}: MPS has no such dtype"
            assert func.namespace != "aten" or has_mps_kernel(name), f"{name} on {devices}: MPS has no kernel"
        return out


def speedrun_module(compose_train: Any) -> ImageClassifier:
    """experiment=speedrun's model (airbench, Muon and SGD groups, TTA), narrowed to stay fast."""
    cfg = compose_train("experiment=speedrun", "model.net.widths=[16,32,32]")
    return instantiate(cfg.model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False)


def on_fake_mps(module: nn.Module) -> None:
    """Replace every parameter and buffer by a fake tensor on "mps" (Module.to("mps") needs MPS support)."""
    for submodule in module.modules():
        for name, param in submodule._parameters.items():
            if param is not None:
                submodule._parameters[name] = nn.Parameter(fake_mps_like(param), requires_grad=param.requires_grad)
        for name, buffer in submodule._buffers.items():
            if buffer is not None:
                submodule._buffers[name] = fake_mps_like(buffer)


class CopiesWithoutDeviceGuard(TorchFunctionMode):
    """`Tensor.copy_` as the aten op itself: the Python method first enters a guard for the destination's device,
    which a build without MPS cannot make, even for fake tensors. The op and what the guard sees are the same."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        op = torch.ops.aten.copy_.default if func is Tensor.copy_ else func
        return op(*args, **(kwargs or {}))


def fake_mps_like(tensor: Tensor) -> Tensor:
    return torch.empty_strided(tensor.shape, tensor.stride(), dtype=tensor.dtype, device="mps")


def batch(device: str, size: int = 64) -> tuple[Tensor, Tensor]:
    images = torch.empty(size, 32, 32, 3, dtype=torch.uint8, device=device)
    return images, torch.empty(size, dtype=torch.int64, device=device)


def update_test_metrics(module: ImageClassifier, logits: Tensor, labels: Tensor) -> None:
    """test_step's metric update, member by member: the collection's first update compares its members' values
    (a host read, harmless on MPS), which meta tensors have not got. torchmetrics counts the confusion matrix
    with the same ops on MPS as in deterministic mode (bincount's output size depends on the data)."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for metric in module.test_metrics.values():
            metric.update(logits, labels)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def test_the_guard_refuses_float64_and_ops_without_an_mps_kernel_on_a_device() -> None:
    assert has_mps_kernel("convolution_backward") and has_mps_kernel("add.Tensor")  # MPS / structured kernels
    assert not has_mps_kernel("_linalg_eigh") and not has_mps_kernel("no_such_op")
    matrix = torch.empty(4, 4, device="meta")
    with pytest.raises(AssertionError, match=r"_to_copy on \['meta'\] with \['torch.float64'\]"), AcceleratorGuard():
        matrix.double()
    with pytest.raises(AssertionError, match=r"_linalg_eigh on \[.meta.\]: MPS has no kernel"), AcceleratorGuard():
        torch.linalg.eigh(matrix)
    with AcceleratorGuard() as guard:
        torch.linalg.eigh(torch.eye(4, dtype=torch.float64))  # on the CPU: anything goes
    assert not guard.device_ops


def test_whitening_fit_leaves_no_float64_and_no_eigh_on_the_device(compose_train: Any) -> None:
    module = speedrun_module(compose_train)
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_fake_mps(module)
        images, _ = batch("mps")
        with CopiesWithoutDeviceGuard(), AcceleratorGuard() as guard:
            module.net.backbone.fit_whitening(module.net.preprocess(images))  # what on_fit_start calls
        weight = module.net.backbone.whiten.weight
        assert (weight.device.type, weight.dtype) == ("mps", torch.float32)
    assert guard.device_ops["_to_copy"] >= 2  # images to the CPU, and the filters back: the guard saw both


def test_training_validation_and_test_steps_leave_no_float64_on_the_device(compose_train: Any) -> None:
    module = speedrun_module(compose_train).to("meta")
    images, labels = batch("meta")
    lookahead = Lookahead(every=1)
    with AcceleratorGuard() as guard:
        optimizer = _build("optimizer", module.hparams["optimizer"], module.param_groups())
        schedule = _build("scheduler", module.hparams["scheduler"], optimizer, total_steps=2)
        lookahead.on_train_start(None, module)  # type: ignore[arg-type]  # it reads the module only
        module.train()
        for step in range(2):
            module.training_step((images, labels), step).backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            lookahead.update(module, lookahead.decay_at(step + 1, 2))
        module.eval()
        with torch.no_grad():
            module.validation_step((images, labels), 0)
            update_test_metrics(module, module(images), labels)
        module.val_acc.compute()
        module.test_metrics.compute()
    for op in ("convolution_backward", "native_batch_norm_backward", "lerp_.Scalar", "linalg_vector_norm", "mm"):
        assert guard.device_ops[op], f"{op} never ran on the device: the steps did not run as training does"
