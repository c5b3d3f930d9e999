"""serve.drift: the per-image statistics, the reference format, the window tests and the sliding-window monitor."""

import json
import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cifarlab_contract.drift import (
    CONTINUOUS,
    TESTS,
    InvalidReference,
    Reference,
    build_reference,
    compare,
    image_statistics,
    traffic_statistics,
)
from cifarlab_contract.model import REFERENCE_KEY
from serve.drift import DriftCollector, DriftMonitor

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


def test_compare_rarely_flags_windows_from_the_reference_distribution(reference: Reference) -> None:
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(reference, window=200)
    flags = []
    for _ in range(30):
        monitor.observe(*window(rng))
        flags.append(monitor.report()["drift_detected"])
    assert sum(flags) <= 2  # alpha 0.01: about 0.3 false alarms expected in 30 windows


@pytest.mark.parametrize(
    ("options", "test"),
    [({"level": 0.75}, "brightness"), ({"spread": 0.05}, "contrast")],
)
def test_compare_flags_shifted_images(reference: Reference, options: dict, test: str) -> None:
    rng = np.random.default_rng(2)
    images, probabilities = window(rng, **options)
    monitor = DriftMonitor(reference, window=200)
    monitor.observe(images, probabilities)
    report = monitor.report()
    assert report["drift_detected"] and report["status"] == "drift"
    assert report["tests"][test]["drifted"] and report["tests"][test]["p_value"] < report["threshold"]
    assert report["tests"][test]["score"] > 0.3


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


def test_monitor_reports_nothing_until_the_window_is_full(reference: Reference) -> None:
    rng = np.random.default_rng(4)
    monitor = DriftMonitor(reference, window=100)
    monitor.observe(*window(rng, count=60, level=0.9))
    report = monitor.report()
    assert report["status"] == "insufficient_data" and not report["drift_detected"]
    assert report["in_window"] == 60 and report["observed"] == 60 and report["tests"] == {}
    monitor.observe(*window(rng, count=40, level=0.9))
    report = monitor.report()
    assert report["in_window"] == 100 and report["drift_detected"]
    assert set(report["tests"]) == set(TESTS) and report["threshold"] == pytest.approx(0.01 / len(TESTS))


def test_monitor_window_slides_past_old_traffic(reference: Reference) -> None:
    rng = np.random.default_rng(5)
    monitor = DriftMonitor(reference, window=100)
    monitor.observe(*window(rng, count=250, level=0.9))  # a batch larger than the window: its last 100 count
    assert monitor.report()["drift_detected"]
    for _ in range(7):  # clean traffic in uneven batches wraps the ring several times
        monitor.observe(*window(rng, count=37))
    report = monitor.report()
    assert report["observed"] == 250 + 7 * 37 and report["in_window"] == 100
    assert not report["drift_detected"], report["tests"]


def test_monitor_tests_the_images_and_outputs_in_its_window(reference: Reference) -> None:
    rng = np.random.default_rng(10)
    monitor = DriftMonitor(reference, window=100)
    monitor.observe(*window(rng, count=70, level=0.9))  # pushed out of the window by what follows
    latest = [window(rng, count=count) for count in (30, 45, 25)]
    for batch in latest:
        monitor.observe(*batch)
    images, probabilities = (np.concatenate(parts) for parts in zip(*latest, strict=True))
    drifted, expected = compare(reference, *traffic_statistics(images, probabilities), 0.01)
    report = monitor.report()
    assert report["drift_detected"] == drifted and set(report["tests"]) == set(expected)
    for name, result in expected.items():
        assert report["tests"][name]["drifted"] == result.drifted, name
        assert report["tests"][name]["p_value"] == pytest.approx(result.p_value), name
        assert report["tests"][name]["score"] == pytest.approx(result.score), name


def test_monitor_caches_the_report_until_new_traffic(reference: Reference) -> None:
    rng = np.random.default_rng(6)
    monitor = DriftMonitor(reference, window=50)
    monitor.observe(*window(rng, count=50))
    first = monitor.report()
    assert monitor.report() is first
    monitor.observe(*window(rng, count=1))
    assert monitor.report() is not first


def test_monitor_is_safe_under_concurrent_observers(reference: Reference) -> None:
    monitor = DriftMonitor(reference, window=200)
    batches = [window(np.random.default_rng(seed), count=25) for seed in range(8)]

    def observe(batch: tuple[np.ndarray, np.ndarray]) -> None:
        for _ in range(20):
            monitor.observe(*batch)
            monitor.report()

    threads = [threading.Thread(target=observe, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = monitor.report()
    assert report["observed"] == 8 * 20 * 25 and report["in_window"] == 200


def test_monitor_rejects_bad_settings_and_inputs(reference: Reference) -> None:
    with pytest.raises(ValueError, match="at least 20"):
        DriftMonitor(reference, window=5)
    with pytest.raises(ValueError, match="alpha"):
        DriftMonitor(reference, alpha=1.5)
    monitor = DriftMonitor(reference)
    rng = np.random.default_rng(7)
    with pytest.raises(ValueError, match="3 classes"):
        monitor.observe(textured_images(4, rng), np.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="4 images but 2 rows"):
        monitor.observe(textured_images(4, rng), confident_probabilities(2, rng))
    with pytest.raises(ValueError, match=r"uint8 images \[N, H, W, 3\]"):
        monitor.observe(textured_images(4, rng).astype(np.float32), confident_probabilities(4, rng))
    monitor.observe(textured_images(4, rng), confident_probabilities(4, rng))
    with pytest.raises(ValueError, match=r"images of \[16, 16, 3\], earlier ones \[32, 32, 3\]"):
        monitor.observe(textured_images(4, rng)[:, :16, :16], confident_probabilities(4, rng))
    assert monitor.report()["observed"] == 4  # the refused batches left nothing behind


def test_collector_exports_scores_and_flag(reference: Reference) -> None:
    rng = np.random.default_rng(8)
    monitor = DriftMonitor(reference, window=100)
    monitor.observe(*window(rng, count=100, level=0.9))
    registry = CollectorRegistry()
    monitors = {"champion": monitor, "challenger": DriftMonitor(reference)}
    registry.register(DriftCollector(lambda: monitors))
    text = generate_latest(registry).decode()
    assert 'cifarlab_drift_detected{variant="champion"} 1.0' in text
    assert 'cifarlab_drift_detected{variant="challenger"} 0.0' in text
    score = registry.get_sample_value("cifarlab_drift_score", {"variant": "champion", "test": "brightness"})
    assert score == pytest.approx(monitor.report()["tests"]["brightness"]["score"]) and score > 0.5
    assert registry.get_sample_value("cifarlab_drift_score", {"variant": "challenger", "test": "brightness"}) is None
