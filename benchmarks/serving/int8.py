"""Static INT8 quantisation (QDQ) of an exported model: is it faster on this machine, and what does it cost?

    CIFAR10_SOURCE=/path/to/cifar10 python -m benchmarks.serving.int8 --model runs/<run id>/model.onnx

Calibrates on real training images (the first `--calibration` of the prepared training split), quantises the
Conv and Gemm weights per channel to int8 with uint8 activations (ONNX Runtime's `quantize_static`, QDQ
format), then measures both models in the same run, with the server's session options: milliseconds per call
at batch 1, images per second at batch 64, and accuracy on the whole test split. Writes
`benchmarks/serving/results/int8.{json,md}`. The issue's bar for shipping it: faster here, and at most 0.5
points of test accuracy lost.
"""

import argparse
import json
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from benchmarks.serving.bench_serve import ROOT, SAMPLE, median_seconds
from cifarlab.data.prepare import Split, ensure_prepared
from serve.model import LoadedModel, load_model
from serve.settings import Settings

INPUT = "images"
BAR_POINTS = 0.5  # most test accuracy the quantised model may lose


class TrainingImages(CalibrationDataReader):
    """Batches of real training images, in the model's input format (uint8 NHWC)."""

    def __init__(self, images: np.ndarray, batch_size: int = 100) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(images, max(1, len(images) // batch_size)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch}


def quantize(model_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """The QDQ int8 model, with the original's metadata (the model contract the server reads)."""
    quantize_static(
        str(model_path),
        str(out_path),
        TrainingImages(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        op_types_to_quantize=["Conv", "Gemm", "MatMul"],
    )
    original, quantized = onnx.load(str(model_path)), onnx.load(str(out_path))
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(original.metadata_props)
    onnx.save(quantized, str(out_path))
    return out_path


def measure(model: LoadedModel, test: Split) -> dict[str, float]:
    numbers: dict[str, float] = {}
    for batch in (1, 64):
        images = test.images[:batch]
        seconds = median_seconds(lambda: model.logits(images))  # noqa: B023 - called within the iteration
        numbers[f"b{batch}_ms"], numbers[f"b{batch}_ips"] = 1000 * seconds, batch / seconds
    predicted = np.concatenate([model.logits(chunk).argmax(1) for chunk in np.array_split(test.images, 20)])
    numbers["test_acc"] = float((predicted == test.labels).mean())
    return numbers


def markdown(report: dict) -> str:
    fp32, int8 = report["fp32"], report["int8"]
    verdict = "ship it" if report["faster"] and report["points_lost"] <= BAR_POINTS else "keep fp32"
    return "\n".join(
        [
            f"# Static INT8 (QDQ) vs fp32 ({report['machine']})",
            "",
            f"Model `{report['model']}`, calibrated on {report['calibration_images']} training images of "
            f"`{report['data']}`; test accuracy on {report['test_images']} test images.",
            "",
            "| model | b1 ms | b64 img/s | test acc |",
            "|---|---|---|---|",
            *(
                f"| {name} | {row['b1_ms']:.2f} | {row['b64_ips']:.0f} | {100 * row['test_acc']:.2f}% |"
                for name, row in (("fp32", fp32), ("int8 QDQ", int8))
            ),
            "",
            f"int8 vs fp32: {fp32['b1_ms'] / int8['b1_ms']:.2f}x at batch 1, {int8['b64_ips'] / fp32['b64_ips']:.2f}x "
            f"at batch 64, {report['points_lost']:+.2f} points of accuracy lost. Verdict: {verdict} (the bar: faster "
            f"and at most {BAR_POINTS} points lost).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported model.onnx (the model contract)")
    parser.add_argument("--data", default=os.environ.get("CIFAR10_SOURCE") or str(SAMPLE), help="CIFAR-10 source")
    parser.add_argument("--calibration", type=int, default=1000, help="training images to calibrate on")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving" / "results")
    args = parser.parse_args()
    if not args.model.is_file():
        parser.error(f"no model at {args.model}: export one first (python train.py)")
    dataset = ensure_prepared(args.data, ROOT / "data" / "prepared")
    settings = Settings(model_uri=str(args.model))
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, onnxruntime {ort.__version__}",
        "model": str(args.model),
        "data": args.data,
        "calibration_images": min(args.calibration, len(dataset.train.images)),
        "test_images": len(dataset.test.images),
    }
    with tempfile.TemporaryDirectory() as scratch:
        int8_path = quantize(args.model, Path(scratch) / "model.int8.onnx", dataset.train.images[: args.calibration])
        for name, path in (("fp32", args.model), ("int8", int8_path)):
            print(f"{name}: measuring", flush=True)
            report[name] = measure(load_model(str(path), settings), dataset.test)
    report["points_lost"] = 100 * (report["fp32"]["test_acc"] - report["int8"]["test_acc"])
    fp32, int8 = report["fp32"], report["int8"]
    report["faster"] = int8["b64_ips"] > fp32["b64_ips"] and int8["b1_ms"] < fp32["b1_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(report, indent=2))
    (args.out / "int8.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
