"""cifarlab_contract.drift: the per-image statistics, the reference format and the window tests."""

import json

import numpy as np
import pytest

from cifarlab_contract.drift import (
    CONTINUOUS,
    InvalidReference,
    Reference,
    build_reference,
    compare,
    image_statistics,
    traffic_statistics,
)
from cifarlab_contract.model import REFERENCE_KEY

CLASSES = tuple(f"c{i}" for i in range(10))


def textured_images(count: int, rng: np.random.Generator, level: float = 0.5, spread: float = 0.15) -> np.ndarray:
    """Images with varied brightness, contrast and texture: a smooth random field per image plus mild noise."""
    field = rng.normal(0, spread, (count, 8, 8, 3)).astype(np.float32).repeat(4, 1).repeat(4, 2)
    base = rng.normal(level, 0.08, (count, 1, 1, 1)).astype(np.float32) + field
    noise = rng.standard_normal((count, 32, 32, 3), dtype=np.float32) * 0.02
    return np.clip(np.rint((base + noise) * 255), 0, 255).astype(np.uint8)


def confident_probabilities(count: int, rng: np.random.Generator, confidence: float = 0.9) -> np.ndarray:
    logits = rng.normal(0, 1, (count, len(CLASSES)))
    logits[np.arange(count), rng.integers(0, len(CLASSES), count)] += 4 * confidence
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def reference() -> Reference:
    rng = np.random.default_rng(0)
    return build_reference(textured_images(2000, rng), confident_probabilities(2000, rng), CLASSES, sample_size=1000)


def test_image_statistics_have_their_meaning() -> None:
    flat = np.full((2, 32, 32, 3), (255, 0, 0), dtype=np.uint8)
    flat[1] = 255
    stats = image_statistics(flat)
    assert set(stats) == {"mean_r", "mean_g", "mean_b", "brightness", "contrast", "sharpness"}
    np.testing.assert_allclose(stats["mean_r"], [1.0, 1.0])
    np.testing.assert_allclose(stats["mean_g"], [0.0, 1.0])
    np.testing.assert_allclose(stats["brightness"], [0.299, 1.0], rtol=1e-5)
    np.testing.assert_allclose(stats["contrast"], [0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(stats["sharpness"], [0.0, 0.0], atol=1e-6)
    stripes = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    stripes[:, :, ::2] = 255  # alternating columns: every horizontal neighbour differs fully
    striped = image_statistics(stripes)
    np.testing.assert_allclose(striped["contrast"], [0.5], rtol=1e-5)
    np.testing.assert_allclose(striped["sharpness"], [0.5], rtol=1e-5)  # horizontal 1, vertical 0


def test_image_statistics_reject_other_inputs() -> None:
    with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, 3\]"):
        image_statistics(np.zeros((2, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8 images"):
        image_statistics(np.zeros((32, 32, 3), dtype=np.uint8))


def test_reference_round_trips_through_json(reference: Reference) -> None:
    text = reference.to_json()
    loaded = Reference.from_json(text)
    assert loaded.classes == CLASSES and loaded.images == 2000 and loaded.class_counts.sum() == 2000
    assert loaded.sample.shape == (1000, len(CONTINUOUS))
    np.testing.assert_allclose(loaded.sample, reference.sample, atol=1e-6)
    np.testing.assert_allclose(loaded.quantiles["confidence"], reference.quantiles["confidence"], atol=1e-6)
    assert list(loaded.quantiles["brightness"]) == sorted(loaded.quantiles["brightness"])
    assert len(text) < 200_000  # bounded: the sample, not every image


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not a valid reference file"),
        (json.dumps({"format_version": 99}), "format_version 99"),
        (json.dumps({"format_version": 1, "classes": ["a"]}), "missing or malformed 'statistics'"),
        ("[1, 2]", "format_version None"),
    ],
)
def test_a_bad_reference_is_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(InvalidReference, match=message):
        Reference.from_metadata({REFERENCE_KEY: text}, CLASSES, where="model.onnx")


def window(rng: np.random.Generator, count: int = 200, **image_options: float) -> tuple[np.ndarray, np.ndarray]:
    return textured_images(count, rng, **image_options), confident_probabilities(count, rng)


def test_compare_flags_a_changed_class_mix_and_lower_confidence(reference: Reference) -> None:
    rng = np.random.default_rng(3)
    images = textured_images(200, rng)
    skewed = confident_probabilities(200, rng)
    skewed[:, 0] += 2.0  # class 0 wins almost everywhere
    skewed /= skewed.sum(axis=1, keepdims=True)
    drifted, results = compare(reference, *traffic_statistics(images, skewed))
    assert drifted and results["class_mix"].drifted and results["class_mix"].score > 0.5
    unsure = np.full((200, len(CLASSES)), 1 / len(CLASSES))
    unsure[:, 1] += 0.05
    drifted, results = compare(reference, *traffic_statistics(images, unsure / unsure.sum(axis=1, keepdims=True)))
    assert drifted and results["confidence"].drifted and results["confidence"].score > 0.9
