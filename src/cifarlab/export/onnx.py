"""ONNX export under the model contract (cifarlab_contract.model), and its verification against the PyTorch model.

Input `images`, uint8 [N, 32, 32, 3] RGB; output `logits`, float32 [N, num_classes]; preprocessing inside the
graph; metadata: classes, run id, data manifest hash, input spec (docs/model-contract.md).
"""

import importlib
import os
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from cifarlab.errors import ExportError
from cifarlab_contract.files import atomic_destination
from cifarlab_contract.model import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME

if TYPE_CHECKING:  # imported for real on the preload's thread: 0.9 s
    from torch.onnx._internal.exporter._registration import ONNXRegistry


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    model = onnx.load(str(path), load_external_data=False)
    return {prop.key: prop.value for prop in model.metadata_props}


# What torch.onnx.export(dynamo=True) imports at its first call: the exporter and onnxscript's library of ATen
# functions, 0.9 s of imports on the build machine (python -X importtime).
EXPORTER_MODULES = ("torch.onnx._internal.exporter._core", "onnxscript.function_libs.torch_lib.ops")
# The ONNX operator set of every export, named rather than left to torch's default (20 in torch 2.13), so that a
# torch upgrade does not change what the servers' ONNX Runtime must support without a change here.
OPSET = 20


def preload_exporter() -> "Future[ONNXRegistry]":
    """Import the exporter and build its table of ONNX functions for ATen operators on a background thread, so
    that an export at the end of training waits for neither: training runs in torch's own threads meanwhile,
    outside the GIL. The future's result is the table (a torch.onnx registry), for `export_onnx(registry=...)`."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preload-onnx-exporter")
    future = pool.submit(_build_registry)
    pool.shutdown(wait=False)
    return future


def _build_registry() -> "ONNXRegistry":
    for module in EXPORTER_MODULES:
        importlib.import_module(module)
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    return ONNXRegistry.from_torchlib(opset_version=OPSET)


@contextmanager
def _reusing(registry: "ONNXRegistry") -> Iterator[None]:
    """torch.onnx.export takes no registry and builds a new one at each call: 0.45 s, as onnxscript reads about
    800 functions' source (torch 2.13, as pinned; its _compat.export_compat). Meanwhile it is handed this one."""
    from torch.onnx._internal.exporter._registration import ONNXRegistry

    declared = ONNXRegistry.__dict__["from_torchlib"]
    build = ONNXRegistry.from_torchlib

    def reuse(opset_version: int = registry.opset_version) -> "ONNXRegistry":
        return registry if opset_version == registry.opset_version else build(opset_version=opset_version)

    ONNXRegistry.from_torchlib = staticmethod(reuse)  # type: ignore[method-assign]
    try:
        yield
    finally:
        ONNXRegistry.from_torchlib = declared  # type: ignore[method-assign]


def export_onnx(
    net: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str], registry: "ONNXRegistry | None" = None
) -> Path:
    """Export `net` (uint8 NHWC in, logits out) with a dynamic batch axis; atomic (temp file, then rename).
    `registry`, from `preload_exporter()`, spares the exporter building its own."""
    path = Path(path)
    example = torch.zeros(2, *IMAGE_SHAPE, dtype=torch.uint8)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), _reusing(registry) if registry is not None else nullcontext():
            program = torch.onnx.export(
                net,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamo=True,
                opset_version=OPSET,
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},  # the name of forward's argument
                verbose=False,
            )
    finally:
        net.train(was_training)
    if program is None:  # only the legacy exporter returns nothing
        raise RuntimeError("torch.onnx.export returned no ONNX program")
    model = program.model_proto
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "cifarlab"
    with atomic_destination(path) as temp:
        onnx.save(model, str(temp))
    return path


def onnx_session(path: str | os.PathLike, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: ort.InferenceSession, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Logits for uint8 images [N, 32, 32, 3], in batches."""
    parts = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(parts)


def verify_onnx(path: str | os.PathLike, net: nn.Module, images: Tensor, tolerance: float = 1e-4) -> float:
    """Compare softmax outputs of the ONNX file and the PyTorch model on real images; raise on a mismatch."""
    images = images.cpu()
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            expected = torch.softmax(net(images.to(next(net.parameters()).device)).float().cpu(), dim=1).numpy()
    finally:
        net.train(was_training)
    logits = onnx_logits(onnx_session(path), images.numpy())
    actual = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX export {path} gives outputs of shape {actual.shape}, PyTorch {expected.shape}")
    difference = float(np.abs(actual - expected).max())
    if not difference <= tolerance:
        raise ExportError(
            f"ONNX export {path} diverges from the PyTorch model: max |softmax difference| = {difference:.3g} "
            f"> {tolerance:g} on {len(images)} validation images"
        )
    return difference
