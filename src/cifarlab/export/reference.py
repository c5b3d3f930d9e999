"""Reference statistics for drift detection, written beside the exported model as `reference.json`.

The statistics come from the exported ONNX file itself, run by ONNX Runtime on the validation images: exactly
the numbers the server will compute on live traffic (`serve.drift`, which also owns the file format and the
per-image statistics, so training and serving share one definition).
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab.runtime import write_atomic
from serve.drift import REFERENCE_FILE, Reference, build_reference


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compute_reference(model_path: str | os.PathLike, images: np.ndarray, sample_size: int = 2000) -> Reference:
    """Reference statistics of the ONNX model at `model_path` on `images` (uint8 [N, 32, 32, 3])."""
    metadata = read_metadata(model_path)
    probabilities = softmax(onnx_logits(onnx_session(model_path), images))
    return build_reference(
        images,
        probabilities,
        json.loads(metadata["classes"]),
        sample_size=sample_size,
        run_id=metadata.get("run_id", ""),
        model_sha256=file_sha256(model_path),
        data_manifest_sha256=metadata.get("data_manifest_sha256", ""),
    )


def write_reference(model_path: str | os.PathLike, images: np.ndarray, sample_size: int = 2000) -> Path:
    """Compute the reference for `model_path` and write it atomically as `reference.json` in the same folder."""
    path = Path(model_path).with_name(REFERENCE_FILE)
    write_atomic(path, compute_reference(model_path, images, sample_size).to_json())
    return path
