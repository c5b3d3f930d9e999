"""serve.feedback: the bounded prediction cache, the durable feedback store replicas share, and the live metrics it
feeds."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from cifarlab.data.prepare import image_folder_key
from cifarlab_contract.feedback import MANIFEST_FILE, FeedbackRecord, record_path
from serve.feedback import (
    ConflictingFeedback,
    FeedbackCollector,
    FeedbackStore,
    FeedbackStoreFailed,
    FeedbackStoreUnavailable,
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


def stored_records(root: Path) -> dict[str, dict]:
    """The record objects under `root`, by prediction id."""
    return {path.stem: json.loads(path.read_text()) for path in (root / "records").rglob("*.json")}


def test_feedback_is_stored_as_a_training_image_and_its_record(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "feedback", CLASSES)
    item = prediction("p1", index=3)
    record, created = store.submit("p1", "bird", cache_with(item).get)
    assert created and record.label == "bird" and record.predicted == "cat" and not record.correct
    image_path = tmp_path / "feedback" / "bird" / "p1.png"
    np.testing.assert_array_equal(np.asarray(Image.open(image_path)), item.image)  # lossless: what the model saw
    assert image_folder_key("train/bird/p1.png", is_dir=False).class_name == "bird"  # data preparation reads it
    stored = json.loads((tmp_path / "feedback" / record_path("p1")).read_text())
    assert (stored["prediction_id"], stored["path"], stored["label"]) == ("p1", "bird/p1.png", "bird")
    assert (stored["request_id"], stored["image_index"]) == ("req", 3)  # kept for correlating logs
    assert not [p for p in (tmp_path / "feedback").rglob(".*")]  # no temp or probe files left behind
    assert not (tmp_path / "feedback" / MANIFEST_FILE).exists()  # older stores' format: read, never written


def test_duplicate_feedback_is_idempotent_and_a_different_label_conflicts(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a"))
    first, _ = store.submit("a", "cat", recent.get)
    again, created = store.submit("a", "cat", RecentPredictions().get)  # evicted from the cache: still idempotent
    assert not created and again == first and len(store) == 1
    assert list(stored_records(tmp_path)) == ["a"]
    with pytest.raises(ConflictingFeedback, match="already has feedback 'cat'"):
        store.submit("a", "bird", recent.get)


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
        store.submit(prediction_id, label, cache_with(prediction("a"), prediction("../escape")).get)
    assert len(store) == 0
    assert [p.name for p in tmp_path.iterdir()] == []


def test_another_replica_finds_stored_feedback_and_a_restart_loses_none(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a"), prediction("b", predicted="bird"))
    store.submit("a", "cat", recent.get)
    store.submit("b", "bird", recent.get)
    other = FeedbackStore(tmp_path, CLASSES)  # another replica on the same store, or this one restarted
    assert other.get("b").label == "bird" and other.get("a") == store.get("a")
    record, created = other.submit("a", "cat", RecentPredictions().get)
    assert not created and record == store.get("a")
    with pytest.raises(ConflictingFeedback, match="already has feedback 'bird'"):
        other.submit("b", "cat", recent.get)
    with pytest.raises(UnknownPrediction, match="no feedback"):
        other.get("c")
    # counters of what each process acknowledged: the two replicas add up to the truth, never count it twice
    assert (len(store), len(other), other.live_metrics()) == (2, 0, [])


@pytest.mark.parametrize("labels", [("cat", "bird"), ("cat", "cat")])
def test_two_replicas_racing_on_one_prediction_store_it_once(tmp_path: Path, labels: tuple[str, str]) -> None:
    """Both see no record, both write their image, one creates the record; the other answers from it."""
    replicas = [FeedbackStore(tmp_path, CLASSES) for _ in labels]
    both_looked = threading.Barrier(2)
    item = prediction("p")

    def find(prediction_id: str) -> Prediction:
        both_looked.wait(10)  # each has checked for a record and found none
        return item

    outcomes: list[object] = [None, None]

    def send(index: int) -> None:
        try:
            outcomes[index] = replicas[index].submit("p", labels[index], find)
        except ConflictingFeedback as error:
            outcomes[index] = error

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    created = [o for o in outcomes if isinstance(o, tuple) and o[1]]
    assert len(created) == 1
    winner = created[0][0]
    (loser,) = [o for o in outcomes if o is not created[0]]
    if labels[0] == labels[1]:
        assert loser == (winner, False)
    else:
        assert isinstance(loser, ConflictingFeedback)
    assert stored_records(tmp_path) == {"p": json.loads(winner.to_line())}
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [winner.path]
    assert sum(len(replica) for replica in replicas) == 1
    assert not [p for p in tmp_path.rglob(".*")]


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
        store.submit(request_id, label, recent.get)
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
    first, _ = store.submit("p0", "cat", recent.get)
    second, created = store.submit("p1", "airplane", recent.get)
    assert created and (first.correct, second.correct) == (True, False)
    assert (first.image_index, second.image_index) == (0, 1)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "airplane/p1.png",
        "cat/p0.png",
    ]
    assert store.get("p1").predicted == "bird"
    with pytest.raises(UnknownPrediction, match="'p2'"):
        store.submit("p2", "cat", recent.get)


def test_shadow_predictions_are_recorded_and_scored(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    recent = cache_with(prediction("a", "cat"), prediction("b", "bird"))
    recent.add_shadow("a", "challenger", "bird", "2")
    recent.add_shadow("b", "challenger", "bird", "2")
    recent.add_shadow("gone", "challenger", "bird", "2")  # evicted meanwhile: nothing happens
    store.submit("a", "bird", recent.get)
    store.submit("b", "bird", recent.get)
    record = stored_records(tmp_path)["a"]
    assert record["shadows"] == {"challenger": {"predicted": "bird", "version": "2", "correct": True}}
    accuracy = {(m.variant, m.version): m.accuracy for m in store.live_metrics()}
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


def test_an_older_manifest_is_read_whole_and_never_changed(tmp_path: Path) -> None:
    """A store from before record objects: its manifest's lines that parse are feedback (those from a newer server
    too), the others and a torn tail are left exactly as they are, and new feedback goes to record objects."""
    lines = [
        FeedbackRecord(i, "cat", "cat", True, 0.9, "v", "1", f"cat/{i}.png", "t", prediction_id=i).to_line().encode()
        for i in "abc"
    ]
    newer = (json.dumps(json.loads(lines[1]) | {"from_the_future": {"x": 1}}) + "\n").encode()
    manifest = tmp_path / MANIFEST_FILE
    manifest.write_bytes(
        lines[0] + b"[1, 2]\n" + newer + b"\xff not utf-8\n" + lines[2] + b'{"prediction_id": "d", "la'
    )
    before = manifest.read_bytes()
    store = FeedbackStore(tmp_path, CLASSES)
    assert [store.get(i).label for i in "abc"] == ["cat"] * 3
    with pytest.raises(ConflictingFeedback):
        store.submit("b", "bird", RecentPredictions().get)
    store.submit("d", "bird", cache_with(prediction("d")).get)
    assert FeedbackStore(tmp_path, CLASSES).get("d").label == "bird"
    assert manifest.read_bytes() == before


def test_record_objects_from_a_newer_server_are_read_and_unreadable_ones_kept(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path, CLASSES)
    store.submit("a", "cat", cache_with(prediction("a")).get)
    newer = tmp_path / record_path("a")
    newer.write_text(json.dumps(json.loads(newer.read_text()) | {"from_the_future": 1}))
    broken = tmp_path / record_path("b")
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff not a record")
    reopened = FeedbackStore(tmp_path, CLASSES)
    assert reopened.get("a").label == "cat"
    with pytest.raises(ConflictingFeedback, match="feedback this server cannot read"):
        reopened.submit("b", "cat", cache_with(prediction("b")).get)
    assert broken.read_bytes() == b"\xff not a record" and not (tmp_path / "cat" / "b.png").exists()


def test_a_store_that_cannot_be_written_is_one_reason(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder would go")
    with pytest.raises(FeedbackStoreUnavailable, match=f"feedback store {blocker / 'store'} is not writable"):
        FeedbackStore(blocker / "store", CLASSES)


def test_a_store_that_fails_while_serving_acknowledges_nothing(tmp_path: Path) -> None:
    store = FeedbackStore(tmp_path / "store", CLASSES)
    (tmp_path / "store" / "records").write_text("a file where the records folder goes: every record write fails")
    with pytest.raises(FeedbackStoreFailed, match=r"cannot take it now .*; retry later"):
        store.submit("a", "cat", cache_with(prediction("a")).get)
    assert len(store) == 0 and store.live_metrics() == []
