"""serve.drift: the service's sliding window over recent traffic, tested against the reference, and its Prometheus
collector (the statistics and tests themselves: tests/contract/test_contract_drift.py)."""

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from cifarlab_contract.drift import TESTS, Reference, compare, traffic_statistics
from serve.drift import DriftCollector, DriftMonitor
from tests.contract.test_contract_drift import confident_probabilities, reference, textured_images, window

__all__ = ["reference"]  # the fixture, shared with the contract's tests


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
