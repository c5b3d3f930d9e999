"""How often the drift monitor flags windows of clean and of corrupted test images: a table, and JSON.

    python scripts/drift_eval.py                          # newest runs/*/model.onnx on $CIFAR10_SOURCE's test split
    python scripts/drift_eval.py --model runs/<id>/model.onnx --prepared data/prepared/cifar10-jpg
    python scripts/drift_eval.py --quick                  # the committed sample (1,000 test images)

The false-alarm rate is checked on the validation split first: a reference built from one half of it against
windows of the other half. Then the model's shipped reference (embedded in its metadata, or computed from the
validation split as training would) meets windows of clean test images and of test images under five common
corruptions at CIFAR-10-C severity 3 (Hendrycks & Dietterich, 2019): gaussian noise, gaussian blur, brightness,
contrast, JPEG re-compression. Each window is tested exactly as the server's DriftMonitor tests its window.

scripts/drift_eval.py is its command line (make drift-eval); paths are relative to $PROJECT_ROOT, which it sets.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from cifarlab.data.datamodule import stratified_split
from cifarlab.data.prepare import SOURCE_ENV_VAR, PreparedDataset, ensure_prepared, load_prepared, source_slug
from cifarlab.errors import ConfigError
from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab_contract.drift import CONTINUOUS, TESTS, Reference, build_reference, compare, softmax, traffic_statistics
from cifarlab_contract.files import write_atomic

MAX_FALSE_ALARMS = 0.05
MIN_DETECTION = 0.90


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)


def gaussian_noise(images: np.ndarray, rng: np.random.Generator, sigma: float = 0.08) -> np.ndarray:
    return _as_uint8(images / 255.0 + rng.normal(0.0, sigma, images.shape))


def gaussian_blur(images: np.ndarray, rng: np.random.Generator, sigma: float = 0.7) -> np.ndarray:
    return _as_uint8(ndimage.gaussian_filter(images / 255.0, sigma=(0, sigma, sigma, 0), mode="nearest"))


def brightness(images: np.ndarray, rng: np.random.Generator, shift: float = 0.15) -> np.ndarray:
    # +shift on HSV value: scaling RGB by new V / old V keeps hue and saturation, as an HSV round trip would.
    pixels = images / 255.0
    value = pixels.max(axis=-1, keepdims=True)
    brighter = np.clip(value + shift, 0.0, 1.0)
    scaled = np.where(value > 0, pixels * brighter / np.maximum(value, 1e-12), brighter)
    return _as_uint8(scaled)


def contrast(images: np.ndarray, rng: np.random.Generator, factor: float = 0.4) -> np.ndarray:
    pixels = images / 255.0
    means = pixels.mean(axis=(1, 2, 3), keepdims=True)
    return _as_uint8((pixels - means) * factor + means)


def jpeg(images: np.ndarray, rng: np.random.Generator, quality: int = 58) -> np.ndarray:
    def recompress(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        return np.asarray(Image.open(buffer).convert("RGB"))

    return np.stack([recompress(image) for image in images])


CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "gaussian_noise (sigma 0.08)": gaussian_noise,
    "gaussian_blur (sigma 0.7)": gaussian_blur,
    "brightness (+0.15 V)": brightness,
    "contrast (x0.4)": contrast,
    "jpeg (quality 58)": jpeg,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an exported model.onnx (default: the newest runs/*/model.onnx)")
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--prepared", type=Path, help="a prepared dataset folder (read only)")
    data.add_argument("--source", help=f"a CIFAR-10 source to prepare into data/prepared (default: ${SOURCE_ENV_VAR})")
    data.add_argument("--quick", action="store_true", help="the committed sample: 1,000 test images")
    parser.add_argument("--window", type=int, default=200, help="images per window (default 200)")
    parser.add_argument("--alpha", type=float, default=0.01, help="family-wise false-alarm rate per window")
    parser.add_argument("--repeats", type=int, default=4, help="shuffles of the test set, each cut into windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_root() / "runs" / "drift_eval.json", help="JSON results")
    return parser.parse_args(argv)


def _root() -> Path:
    return Path(os.environ.get("PROJECT_ROOT", os.getcwd()))


def newest_model() -> Path:
    models = sorted((_root() / "runs").glob("*/model.onnx"), key=lambda path: path.stat().st_mtime)
    if not models:
        raise ConfigError("no runs/*/model.onnx: train a model first (make train) or pass --model")
    return models[-1]


def load_dataset(args: argparse.Namespace) -> PreparedDataset:
    if args.prepared:
        return load_prepared(args.prepared)
    data = _root() / "data"
    source = data / "cifar10-sample.tar.gz" if args.quick else (args.source or _env_source())
    return ensure_prepared(source, data / "prepared" / source_slug(source))


def _env_source() -> str:
    if not os.environ.get(SOURCE_ENV_VAR):
        raise ConfigError(f"no data: set {SOURCE_ENV_VAR}, or pass --source, --prepared or --quick")
    return os.environ[SOURCE_ENV_VAR]


def validation_images(model: Path, dataset: PreparedDataset) -> np.ndarray:
    """The run's own validation split, re-drawn from its recorded config (val_fraction, seed)."""
    config_path = model.parent / "config.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    fraction = config.get("data", {}).get("val_fraction", 0.1)
    _, val = stratified_split(dataset.train.labels, fraction, config.get("seed", 42))
    return dataset.train.images[val]


def window_rates(
    reference: Reference, values: np.ndarray, predicted: np.ndarray, args: argparse.Namespace
) -> dict[str, object]:
    """Cut `repeats` shuffles of the images into windows; how often is a window flagged, and by which test."""
    rng = np.random.default_rng(args.seed)
    flagged: list[bool] = []
    fired = {test: 0 for test in TESTS}
    scores: dict[str, list[float]] = {test: [] for test in TESTS}
    for _ in range(args.repeats):
        order = rng.permutation(len(values))
        for start in range(0, len(order) - args.window + 1, args.window):
            rows = order[start : start + args.window]
            drifted, results = compare(reference, values[rows], predicted[rows], args.alpha)
            flagged.append(drifted)
            for test, result in results.items():
                fired[test] += result.drifted
                scores[test].append(result.score)
    if not flagged:
        raise ConfigError(f"fewer than --window {args.window} images: no window to test")
    return {
        "windows": len(flagged),
        "flagged": int(sum(flagged)),
        "rate": float(np.mean(flagged)),
        "fired": fired,
        "median_score": {test: float(np.median(values)) for test, values in scores.items()},
    }


def evaluate(args: argparse.Namespace) -> dict:
    model = args.model or newest_model()
    if not model.is_file():
        raise ConfigError(f"model file not found: {model}")
    dataset = load_dataset(args)
    session = onnx_session(model)
    val_images = validation_images(model, dataset)

    def statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probabilities = softmax(onnx_logits(session, images))
        return (*traffic_statistics(images, probabilities), probabilities)

    # Calibration on validation only: a reference from one half, windows from the other.
    val_values, val_predicted, val_probabilities = statistics(val_images)
    order = np.random.default_rng(args.seed).permutation(len(val_images))
    first, second = order[::2], order[1::2]
    calibration_reference = build_reference(val_images[first], val_probabilities[first], dataset.classes)
    calibration = window_rates(calibration_reference, val_values[second], val_predicted[second], args)
    conditions = {"validation (calibration)": calibration}

    shipped = Reference.from_metadata(read_metadata(model), dataset.classes, where=str(model))
    # without one (a model exported before references existed): as training would have computed it
    reference = shipped or build_reference(val_images, val_probabilities, dataset.classes)
    rng = np.random.default_rng(args.seed)
    test_images, labels = dataset.test.images, dataset.test.labels
    for name, corrupt in {"clean test": None, **CORRUPTIONS}.items():
        images = test_images if corrupt is None else corrupt(test_images, rng)
        values, predicted, _ = statistics(images)
        conditions[name] = window_rates(reference, values, predicted, args) | {
            "accuracy": float(np.mean(predicted == labels))
        }
    return {
        "model": str(model),
        "reference": "embedded in the model" if shipped else "computed from the validation split",
        "window": args.window,
        "alpha": args.alpha,
        "tests": list(TESTS),
        "statistics": list(CONTINUOUS),
        "test_images": len(test_images),
        "conditions": conditions,
    }


def format_table(results: dict) -> str:
    header = f"{'condition':<30}{'windows':>8}{'flagged':>9}{'rate':>8}{'accuracy':>10}  tests that fire in >= half"
    lines = [header, "-" * len(header)]
    for name, row in results["conditions"].items():
        accuracy = f"{row['accuracy']:.3f}" if "accuracy" in row else ""
        ranked = sorted(row["fired"].items(), key=lambda item: -item[1])
        fired = ", ".join(f"{test} {count}" for test, count in ranked if count >= row["windows"] / 2) or "-"
        lines.append(f"{name:<30}{row['windows']:>8}{row['flagged']:>9}{row['rate']:>8.3f}{accuracy:>10}  {fired}")
    return "\n".join(lines)


def verdict(results: dict) -> list[str]:
    conditions = results["conditions"]
    lines = [
        f"clean test windows flagged {conditions['clean test']['rate']:.1%} (target <= {MAX_FALSE_ALARMS:.0%}): "
        + ("PASS" if conditions["clean test"]["rate"] <= MAX_FALSE_ALARMS else "FAIL")
    ]
    for name in CORRUPTIONS:
        rate = conditions[name]["rate"]
        lines.append(
            f"{name} windows flagged {rate:.1%} (target >= {MIN_DETECTION:.0%}): "
            + ("PASS" if rate >= MIN_DETECTION else "FAIL")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results = evaluate(args)
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"model {results['model']}; reference: {results['reference']}")
    tests = len(TESTS)
    print(
        f"windows of {results['window']} images, family-wise alpha {results['alpha']} (Bonferroni over {tests} tests)"
    )
    print(format_table(results))
    print("\n".join(verdict(results)))
    write_atomic(args.out, json.dumps(results, indent=2))
    print(f"-> {args.out} ({results['seconds']} s)")
    return 0
