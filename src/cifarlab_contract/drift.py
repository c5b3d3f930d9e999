"""Drift statistics and the reference format: what training embeds in each exported model, and what the service tests
its recent traffic against.

Training computes the reference from the validation images (cifarlab.export.reference) with the same
`image_statistics` the server applies to live traffic, so the two sides cannot disagree on what a statistic means.
The reference travels inside the ONNX file's metadata (key `drift_reference`) wherever the model goes (registry,
DVC, image).

A window of traffic is tested statistic by statistic: two-sample Kolmogorov-Smirnov on confidence and the image
statistics, chi-squared on the predicted-class mix. It counts as drifted when any test rejects at `alpha` divided
by the number of tests (Bonferroni: the false-alarm rate of the whole family stays <= alpha).

numpy only (the significance tests are cifarlab_contract.significance).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cifarlab_contract.model import REFERENCE_KEY
from cifarlab_contract.significance import chi2_independence, ks_two_sample

REFERENCE_FORMAT_VERSION = 1
# BT.601 luma weights: brightness and contrast as a person would judge them, not as an average of channels.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
IMAGE_STATISTICS = ("mean_r", "mean_g", "mean_b", "brightness", "contrast", "sharpness")
CONTINUOUS = ("confidence", *IMAGE_STATISTICS)
CLASS_MIX = "class_mix"
TESTS = (*CONTINUOUS, CLASS_MIX)
QUANTILES = np.linspace(0.0, 1.0, 101)


class InvalidReference(ValueError):
    """A reference file is missing, malformed or does not fit the model it is used with."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities from logits [N, classes]: what the server answers with and the monitor observes, and
    what the reference is computed from at export, so both sides share one definition."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image statistics of uint8 RGB images [N, H, W, 3], each a float64 array [N] in [0, 1].

    mean_r/g/b: channel means; brightness: mean luma; contrast: standard deviation of luma; sharpness: mean
    absolute difference between neighbouring luma pixels (falls under blur, rises under noise).
    """
    check_images(images)
    pixels = images.astype(np.float32) / 255.0
    channel_means = pixels.mean(axis=(1, 2), dtype=np.float64)
    luma = pixels @ LUMA
    horizontal = np.abs(np.diff(luma, axis=2)).mean(axis=(1, 2), dtype=np.float64)
    vertical = np.abs(np.diff(luma, axis=1)).mean(axis=(1, 2), dtype=np.float64)
    return {
        "mean_r": channel_means[:, 0],
        "mean_g": channel_means[:, 1],
        "mean_b": channel_means[:, 2],
        "brightness": luma.mean(axis=(1, 2), dtype=np.float64),
        "contrast": luma.std(axis=(1, 2), dtype=np.float64),
        "sharpness": (horizontal + vertical) / 2.0,
    }


def check_images(images: np.ndarray) -> None:
    """ValueError unless `images` are uint8 RGB images [N, H, W, 3]."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {list(images.shape)}")


def traffic_statistics(images: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the monitor records per image: the CONTINUOUS statistics as columns [N, 7] and the predicted class."""
    if len(images) != len(probabilities):
        raise ValueError(f"{len(images)} images but {len(probabilities)} rows of probabilities")
    columns = {"confidence": probabilities.max(axis=1).astype(np.float64), **image_statistics(images)}
    return np.stack([columns[name] for name in CONTINUOUS], axis=1), probabilities.argmax(axis=1)


@dataclass(frozen=True)
class Reference:
    """Reference statistics of one model on its validation images (the JSON of its `drift_reference` metadata)."""

    classes: tuple[str, ...]
    images: int
    class_counts: np.ndarray  # predicted-class counts over all reference images
    quantiles: dict[str, np.ndarray]  # per statistic, the 0..100th percentiles over all reference images
    sample: np.ndarray  # [S, len(CONTINUOUS)]: a seeded random sample of the images' statistics (S bounded)
    provenance: dict[str, str]  # run id, data manifest sha256, ...

    def to_json(self) -> str:
        def rounded(values: np.ndarray) -> list[float]:
            return [round(float(v), 6) for v in values]

        document = {
            "format_version": REFERENCE_FORMAT_VERSION,
            "classes": list(self.classes),
            "images": self.images,
            "class_counts": [int(c) for c in self.class_counts],
            "statistics": {
                name: {"quantiles": rounded(self.quantiles[name]), "sample": rounded(self.sample[:, i])}
                for i, name in enumerate(CONTINUOUS)
            },
            "provenance": self.provenance,
        }
        return json.dumps(document, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, where: str = "reference") -> Reference:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidReference(f"{where} is not a valid reference file: {error}") from error
        version = document.get("format_version") if isinstance(document, dict) else None
        if version != REFERENCE_FORMAT_VERSION:
            raise InvalidReference(
                f"{where}: format_version {version!r}, this server reads {REFERENCE_FORMAT_VERSION}; "
                "re-export the model to refresh it"
            )
        try:
            statistics = document["statistics"]
            reference = cls(
                classes=tuple(document["classes"]),
                images=int(document["images"]),
                class_counts=np.asarray(document["class_counts"], dtype=np.int64),
                quantiles={name: np.asarray(statistics[name]["quantiles"], dtype=np.float64) for name in CONTINUOUS},
                sample=np.array([statistics[name]["sample"] for name in CONTINUOUS], dtype=np.float64).T,
                provenance=dict(document.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise InvalidReference(f"{where} is not a valid reference file: missing or malformed {error}") from error
        if len(reference.class_counts) != len(reference.classes) or len(reference.sample) == 0:
            raise InvalidReference(f"{where}: class counts do not match the classes, or the sample is empty")
        return reference

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], classes: Sequence[str], where: str) -> Reference | None:
        """The reference embedded in a model's metadata; None for a model exported without one."""
        text = metadata.get(REFERENCE_KEY)
        if text is None:
            return None
        reference = cls.from_json(text, where=f"{where} ({REFERENCE_KEY} metadata)")
        if reference.classes != tuple(classes):
            raise InvalidReference(f"{where}: the drift reference's classes {reference.classes} are not the model's")
        return reference


def build_reference(
    images: np.ndarray,
    probabilities: np.ndarray,
    classes: Sequence[str],
    sample_size: int = 2000,
    seed: int = 0,
    **provenance: str,
) -> Reference:
    """Reference statistics from a model's softmax outputs on held-out images (the validation split)."""
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise ValueError(f"probabilities of shape {list(probabilities.shape)} do not fit {len(classes)} classes")
    values, predicted = traffic_statistics(images, probabilities)
    rows = np.random.default_rng(seed).permutation(len(values))[:sample_size]
    return Reference(
        classes=tuple(classes),
        images=len(values),
        class_counts=np.bincount(predicted, minlength=len(classes)),
        quantiles={name: np.quantile(values[:, i], QUANTILES) for i, name in enumerate(CONTINUOUS)},
        sample=values[np.sort(rows)],
        provenance=provenance,
    )


@dataclass(frozen=True)
class DriftTest:
    """The outcome of one test of a window against the reference."""

    test: str  # "ks" or "chi2"
    statistic: float
    p_value: float
    score: float  # effect size in [0, 1]: the KS distance, or the total-variation distance of the class mixes
    drifted: bool  # p_value below the corrected threshold


def compare(
    reference: Reference, values: np.ndarray, predicted: np.ndarray, alpha: float = 0.01
) -> tuple[bool, dict[str, DriftTest]]:
    """Test one window (statistics [n, 7] and predicted classes [n]) against the reference.

    Returns the flag (any test rejects at alpha / number of tests) and every test's result.
    """
    threshold = alpha / len(TESTS)
    distances, p_values = ks_two_sample(values, reference.sample)
    results = {
        name: DriftTest("ks", float(d), float(p), float(d), bool(p < threshold))
        for name, d, p in zip(CONTINUOUS, distances, p_values, strict=True)
    }
    window_counts = np.bincount(predicted, minlength=len(reference.classes))
    table = np.stack([window_counts, reference.class_counts])
    table = table[:, table.sum(axis=0) > 0]  # a class neither side predicted carries no information
    chi2, p_value = chi2_independence(table) if table.shape[1] > 1 else (0.0, 1.0)
    distance = 0.5 * np.abs(table[0] / table[0].sum() - table[1] / table[1].sum()).sum()
    results[CLASS_MIX] = DriftTest("chi2", float(chi2), float(p_value), float(distance), bool(p_value < threshold))
    return any(result.drifted for result in results.values()), results
