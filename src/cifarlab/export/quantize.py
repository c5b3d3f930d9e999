"""Static INT8 quantisation (QDQ) of an exported model.

ONNX Runtime's `quantize_static`: the Conv, Gemm and MatMul weights per output channel to int8 and the
activations to uint8, with ranges calibrated on real training images. (Never dynamic quantisation: for these
convnets it is slower than fp32.) The int8 file keeps the fp32 file's metadata, that is the model contract and
the drift reference, so the server serves it unchanged. The reference was measured with the fp32 model, which
the int8 model matches to a few hundredths of a point of test accuracy (docs/results.md).

The weights keep 7 bits (`reduce_range`): x86 CPUs without VNNI (AVX2 only) multiply uint8 activations by int8
weights with an instruction that adds each pair of products into int16 and saturates. With 7-bit weights a pair
stays within int16 (2 x 255 x 64 < 32767), so those CPUs compute exactly what VNNI CPUs compute; with 8 bits the
same file gave other logits there (ONNX Runtime's quantisation guide names the remedy). Checking the model on
the machine that quantises then holds for the machine that serves.
"""

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab_contract.files import atomic_destination
from cifarlab_contract.model import INPUT_NAME

QUANTIZATION_KEY = "quantization"  # metadata: how the weights were quantised, absent in an fp32 export
MAX_ACCURACY_LOSS = 0.5  # test accuracy points an int8 model may lose and still replace the fp32 one


class _CalibrationImages(CalibrationDataReader):
    def __init__(self, images: np.ndarray, batch_size: int) -> None:
        self._batches: Iterator[np.ndarray] = (images[i : i + batch_size] for i in range(0, len(images), batch_size))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(
    model_path: str | os.PathLike, out_path: str | os.PathLike, calibration: np.ndarray, batch_size: int = 100
) -> Path:
    """Write the static-int8 (QDQ) version of the model at `model_path` to `out_path`, atomically, with the
    original's metadata; `calibration` is uint8 [N, 32, 32, 3] training images."""
    if len(calibration) == 0:
        raise ValueError("no calibration images")
    with tempfile.TemporaryDirectory() as scratch:
        quantized_path = Path(scratch) / "model.int8.onnx"
        quantize_static(
            str(model_path),
            str(quantized_path),
            _CalibrationImages(calibration, batch_size),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            reduce_range=True,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
        )
        model = onnx.load(str(quantized_path))
    how = f"static int8 QDQ, 7-bit weights, {len(calibration)} images"
    metadata = {**read_metadata(model_path), QUANTIZATION_KEY: how}
    del model.metadata_props[:]
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    out_path = Path(out_path)
    with atomic_destination(out_path) as temp:
        onnx.save(model, str(temp))
    return out_path


def onnx_accuracy(model_path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of an exported model on uint8 images [N, 32, 32, 3]."""
    return float((onnx_logits(onnx_session(model_path), images).argmax(1) == labels).mean())
