"""Reference statistics for drift detection, embedded in the exported model's metadata (`drift_reference`).

The statistics come from the exported ONNX file itself, run by ONNX Runtime on the validation images: exactly the
numbers the server will compute on live traffic (`cifarlab_contract.drift` owns the format and the per-image
statistics, so training and serving share one definition). Inside the file, the reference cannot be separated
from its model: the registry, DVC and the serving image carry both at once.
"""

import os
from pathlib import Path

import numpy as np
import onnx

from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab_contract.drift import Reference, build_reference, softmax
from cifarlab_contract.files import atomic_destination
from cifarlab_contract.model import DATA_MANIFEST_KEY, REFERENCE_KEY, RUN_ID_KEY, metadata_classes


def compute_reference(model_path: str | os.PathLike, images: np.ndarray, sample_size: int = 2000) -> Reference:
    """Reference statistics of the ONNX model at `model_path` on `images` (uint8 [N, 32, 32, 3])."""
    metadata = read_metadata(model_path)
    probabilities = softmax(onnx_logits(onnx_session(model_path), images))
    return build_reference(
        images,
        probabilities,
        metadata_classes(metadata),
        sample_size=sample_size,
        run_id=metadata.get(RUN_ID_KEY, ""),
        data_manifest_sha256=metadata.get(DATA_MANIFEST_KEY, ""),
    )


def embed_reference(model_path: str | os.PathLike, images: np.ndarray, sample_size: int = 2000) -> Reference:
    """Compute the reference of `model_path` and store it in the file's metadata (replacing an older one);
    the file is rewritten atomically."""
    reference = compute_reference(model_path, images, sample_size)
    model = onnx.load(str(model_path))
    kept = [prop for prop in model.metadata_props if prop.key != REFERENCE_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=REFERENCE_KEY, value=reference.to_json())
    with atomic_destination(Path(model_path)) as temp:
        onnx.save(model, str(temp))
    return reference
