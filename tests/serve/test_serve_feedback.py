"""serve.feedback: the bounded prediction cache, the durable feedback store and the live metrics it feeds."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from cifarlab.data.prepare import image_folder_key
from cifarlab_contract.feedback import MANIFEST_FILE
from serve.feedback import (
    ConflictingFeedback,
    FeedbackCollector,
    FeedbackStore,
    InvalidFeedback,
    Prediction,
    RecentPredictions,
    UnknownPrediction,
)

CLASSES = ("airplane", "automobile", "bird", "cat")


def prediction(
    prediction_id: str, predicted: str = "cat", variant: str = "champion", version: str = "1", index: int = 0
) -> Prediction:
    seed = sum(prediction_id.encode()) + index
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    return Prediction(prediction_id, image, predicted, 0.9, variant, version, request_id="req", image_index=index)


def cache_with(*predictions: Prediction) -> RecentPredictions:
    recent = RecentPredictions()
    for item in predictions:
        recent.add(item)
    return recent


def test_cache_is_bounded_by_count_and_by_bytes() -> None:
    by_count = RecentPredictions(max_items=3)
    for i in range(5):
        by_count.add(prediction(f"r{i}"))
    assert len(by_count) == 3 and by_count.nbytes == 3 * 3072
    with pytest.raises(UnknownPrediction, match="no recent prediction with id 'r1'"):
        by_count.get("r1")
    assert by_count.get("r4").prediction_id == "r4"
    by_bytes = RecentPredictions(max_items=100, max_bytes=2 * 3072 + 10)
    for i in range(4):
        by_bytes.add(prediction(f"r{i}"))
    assert len(by_bytes) == 2 and by_bytes.nbytes == 2 * 3072
    by_bytes.add(prediction("r3", predicted="dog"))  # the same id again replaces, not duplicates
    assert len(by_bytes) == 2 and by_bytes.get("r3").predicted == "dog"


def test_feedback_is_stored_as_a_training_image_and_a_manifest_line(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "feedback", CLASSES)
    item = prediction("p1", index=3)
    record, created = store.submit("p1", "bird", cache_with(item))
    assert created and record.label == "bird" and record.predicted == "cat" and not record.correct
    image_path = tmp_path / "feedback" / "bird" / "p1.png"
    np.testing.assert_array_equal(np.asarray(Image.open(image_path)), item.image)  # lossless: what the model saw
    assert image_folder_key("train/bird/p1.png", is_dir=False).class_name == "bird"  # data preparation reads it
    (line,) = (tmp_path / "feedback" / MANIFEST_FILE).read_text().splitlines()
    stored = json.loads(line)
    assert (stored["prediction_id"], stored["path"]) == ("p1", "bird/p1.png")
    assert (stored["request_id"], stored["image_index"]) == ("req", 3)  # kept for correlating logs
    assert not [p for p in (tmp_path / "feedback").rglob(".*")]  # no temp files left behind


def test_duplicate_feedback_is_idempotent_and_a_different_label_conflicts(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a"))
    first, _ = store.submit("a", "cat", recent)
    again, created = store.submit("a", "cat", RecentPredictions())  # evicted from the cache: still idempotent
    assert not created and again == first and len(store) == 1
    assert len((tmp_path / MANIFEST_FILE).read_text().splitlines()) == 1
    with pytest.raises(ConflictingFeedback, match="already has feedback 'cat'"):
        store.submit("a", "bird", recent)


@pytest.mark.parametrize(
    ("prediction_id", "label", "error", "message"),
    [
        ("a", "dog", InvalidFeedback, "not one of the model's classes"),
        ("a", 3, InvalidFeedback, "not one of the model's classes"),
        ("../escape", "cat", InvalidFeedback, "not a valid id"),
        (".hidden", "cat", InvalidFeedback, "not a valid id"),
        ("never-seen", "cat", UnknownPrediction, "never issued, or expired"),
        ("a~0", "cat", InvalidFeedback, "not a valid id"),
    ],
)
def test_bad_feedback_is_refused_and_writes_nothing(
    tmp_path: Path, prediction_id: object, label: object, error: type, message: str
) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    with pytest.raises(error, match=message):
        store.submit(prediction_id, label, cache_with(prediction("a"), prediction("../escape")))
    assert len(store) == 0 and not (tmp_path / MANIFEST_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_feedback_survives_a_restart_and_a_torn_last_line(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a"), prediction("b", predicted="bird"))
    store.submit("a", "cat", recent)
    store.submit("b", "bird", recent)
    manifest = tmp_path / MANIFEST_FILE
    intact = manifest.read_bytes()
    manifest.write_bytes(intact + b'{"request_id": "c", "lab')  # a crash in the middle of an append
    reopened = FeedbackStore(tmp_path, CLASSES)
    assert len(reopened) == 2 and reopened.get("b").label == "bird"
    assert manifest.read_bytes() == intact  # the unacknowledged tail is cut
    _, created = reopened.submit("a", "cat", RecentPredictions())
    assert not created
    with pytest.raises(UnknownPrediction, match="no feedback"):
        reopened.get("c")
    assert [m.accuracy for m in reopened.live_metrics()] == [1.0]


def test_live_metrics_per_variant_and_version(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    answers = [  # (id, variant, version, predicted, true label)
        ("1", "champion", "1", "cat", "cat"),
        ("2", "champion", "1", "cat", "bird"),
        ("3", "champion", "1", "bird", "bird"),
        ("4", "champion", "1", "airplane", "airplane"),
        ("5", "challenger", "2", "cat", "cat"),
    ]
    recent = cache_with(*(prediction(i, predicted, variant, version) for i, variant, version, predicted, _ in answers))
    for request_id, *_, label in answers:
        store.submit(request_id, label, recent)
    challenger, champion = store.live_metrics()
    assert (champion.variant, champion.version, champion.count, champion.accuracy) == ("champion", "1", 4, 0.75)
    assert champion.precision == {"airplane": 1.0, "bird": 1.0, "cat": 0.5}
    assert champion.recall == {"airplane": 1.0, "bird": 0.5, "cat": 1.0}
    assert (challenger.variant, challenger.accuracy, challenger.recall) == ("challenger", 1.0, {"cat": 1.0})
    assert store.feedback_counts() == {("champion", True): 3, ("champion", False): 1, ("challenger", True): 1}

    registry = CollectorRegistry()
    registry.register(FeedbackCollector(store))
    value = registry.get_sample_value
    assert value("cifarlab_feedback_total", {"variant": "champion", "correct": "false"}) == 1
    assert value("cifarlab_live_accuracy", {"variant": "champion", "version": "1"}) == 0.75
    assert value("cifarlab_live_precision", {"variant": "champion", "version": "1", "label": "cat"}) == 0.5
    assert value("cifarlab_live_recall", {"variant": "champion", "version": "1", "label": "bird"}) == 0.5
    assert value("cifarlab_live_recall", {"variant": "challenger", "version": "2", "label": "bird"}) is None


def test_each_image_of_a_request_has_its_own_feedback(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("p0", "cat", index=0), prediction("p1", "bird", index=1))
    first, _ = store.submit("p0", "cat", recent)
    second, created = store.submit("p1", "airplane", recent)
    assert created and (first.correct, second.correct) == (True, False)
    assert (first.image_index, second.image_index) == (0, 1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "airplane/p1.png",
        "cat/p0.png",
    ]
    assert store.get("p1").predicted == "bird"
    with pytest.raises(UnknownPrediction, match="'p2'"):
        store.submit("p2", "cat", recent)


def test_shadow_predictions_are_recorded_and_scored(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a", "cat"), prediction("b", "bird"))
    recent.add_shadow("a", "challenger", "bird", "2")
    recent.add_shadow("b", "challenger", "bird", "2")
    recent.add_shadow("gone", "challenger", "bird", "2")  # evicted meanwhile: nothing happens
    store.submit("a", "bird", recent)
    store.submit("b", "bird", recent)
    record = json.loads((tmp_path / MANIFEST_FILE).read_text().splitlines()[0])
    assert record["shadows"] == {"challenger": {"predicted": "bird", "version": "2", "correct": True}}
    accuracy = {(m.variant, m.version): m.accuracy for m in FeedbackStore(tmp_path, CLASSES).live_metrics()}
    assert accuracy == {("champion", "1"): 0.5, ("challenger", "2"): 1.0}
    assert store.feedback_counts() == {("champion", False): 1, ("champion", True): 1, ("challenger", True): 2}


def test_a_manifest_line_without_the_newer_fields_still_loads(tmp_path: Path) -> None:
    line = {
        "request_id": "old",
        "label": "cat",
        "predicted": "cat",
        "correct": True,
        "confidence": 0.8,
        "variant": "default",
        "version": "abc",
        "path": "cat/old.png",
        "received_at": "2026-11-01T00:00:00.000+00:00",
    }
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(line) + "\n")
    record = FeedbackStore(tmp_path, CLASSES).get("old~0")  # keyed as stores before prediction ids were
    assert (record.image_index, record.shadows, record.correct, record.prediction_id) == (0, {}, True, "")


def test_a_restart_keeps_lines_it_cannot_read_and_cuts_only_a_torn_tail(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a"), prediction("b"), prediction("c"))
    for prediction_id in "abc":
        store.submit(prediction_id, "cat", recent)
    manifest = tmp_path / MANIFEST_FILE
    first, second, third = manifest.read_bytes().splitlines(keepends=True)
    newer = (json.dumps(json.loads(second) | {"from_the_future": {"x": 1}}) + "\n").encode()
    kept = first + b"[1, 2]\n" + newer + b"\xff not utf-8\n" + third
    manifest.write_bytes(kept + b'{"prediction_id": "d", "label": "ca')
    reopened = FeedbackStore(tmp_path, CLASSES)
    assert len(reopened) == 3 and [reopened.get(i).label for i in "abc"] == ["cat"] * 3
    assert manifest.read_bytes() == kept  # only the unterminated tail is gone
    reopened.submit("d", "bird", cache_with(prediction("d")))
    assert len(FeedbackStore(tmp_path, CLASSES)) == 4  # the next append starts on a line of its own
