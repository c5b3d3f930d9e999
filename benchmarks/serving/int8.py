"""Static INT8 (QDQ) against fp32 for an exported model: speed as the server runs it, and test accuracy.

    CIFAR10_SOURCE=/path/to/cifar10 python -m benchmarks.serving.int8 --model runs/<run id>/model.onnx

Quantises with `cifarlab.export.quantize` (calibrated on the first `--calibration` training images), then
measures both models in the same run: milliseconds per call at batch 1 and images per second at batch 64
with the server's session options, and accuracy on the whole test split. Writes
`benchmarks/serving/results/int8.{json,md}`. The bar for using it: faster here, and at most MAX_ACCURACY_LOSS (0.5)
points of test accuracy lost (`scripts/quantize.py` applies that bar when it writes the int8 file).
"""

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import onnxruntime as ort

from benchmarks.serving.bench_serve import ROOT, SAMPLE, median_seconds
from cifarlab.data.prepare import SOURCE_ENV_VAR, Split, ensure_prepared
from cifarlab.export.quantize import MAX_ACCURACY_LOSS, onnx_accuracy, quantize_int8
from serve.model import load_model
from serve.settings import Settings


def measure(path: Path, settings: Settings, test: Split) -> dict[str, float]:
    model = load_model(str(path), settings)
    numbers: dict[str, float] = {}
    for batch in (1, 64):
        images = test.images[:batch]
        seconds = median_seconds(lambda: model.logits(images))  # noqa: B023 - called within the iteration
        numbers[f"b{batch}_ms"], numbers[f"b{batch}_ips"] = 1000 * seconds, batch / seconds
    numbers["test_acc"] = onnx_accuracy(path, test.images, test.labels)
    return numbers


def markdown(report: dict) -> str:
    fp32, int8 = report["fp32"], report["int8"]
    verdict = "ship it" if report["faster"] and report["points_lost"] <= MAX_ACCURACY_LOSS else "keep fp32"
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
            f"and at most {MAX_ACCURACY_LOSS} points lost).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="an exported model.onnx (the model contract)")
    parser.add_argument("--data", default=os.environ.get(SOURCE_ENV_VAR) or str(SAMPLE), help="CIFAR-10 source")
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
        "data": Path(args.data).name,
        "calibration_images": min(args.calibration, len(dataset.train.images)),
        "test_images": len(dataset.test.images),
    }
    with tempfile.TemporaryDirectory() as scratch:
        int8_path = quantize_int8(
            args.model, Path(scratch) / "model.int8.onnx", dataset.train.images[: args.calibration]
        )
        for name, path in (("fp32", args.model), ("int8", int8_path)):
            print(f"{name}: measuring", flush=True)
            report[name] = measure(path, settings, dataset.test)
    report["points_lost"] = 100 * (report["fp32"]["test_acc"] - report["int8"]["test_acc"])
    fp32, int8 = report["fp32"], report["int8"]
    report["faster"] = int8["b64_ips"] > fp32["b64_ips"] and int8["b1_ms"] < fp32["b1_ms"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8.json").write_text(json.dumps(report, indent=2))
    (args.out / "int8.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
