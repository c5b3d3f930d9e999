"""A replica killed with SIGKILL while it logs predictions and acknowledges feedback under load: after a restart on
the same folders every acknowledged feedback record is there (API, record, image), nothing was stored that was
never sent, the prediction log reads back (only a torn last write tolerated) and the new server serves; and, made
deterministic, the torn log images such a kill can leave must not break feedback after the restart."""

import io
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.feedback import PREDICTION_ID_PATTERN, open_feedback_store
from serve.predlog import RECORD_CHUNK, LoggedPrediction
from tests.serve.conftest import API_KEY, Server, noise_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # two real servers, a kill under load: ~20 s

CLIENTS = 4
IMAGES_PER_REQUEST = 2
KILL_AFTER = 300  # acknowledged feedback records before the kill
LOG_FIELDS = {f.name for f in fields(LoggedPrediction)}


def label_of(seed: int) -> str:
    return CIFAR10_CLASSES[seed % len(CIFAR10_CLASSES)]


def other_label(seed: int) -> str:
    return CIFAR10_CLASSES[(seed + 1) % len(CIFAR10_CLASSES)]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@dataclass
class Load:
    """Clients that predict two noise images at a time and send feedback on each answered image, until the server
    stops answering."""

    url: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    answered: dict[str, int] = field(default_factory=dict)  # prediction id -> seed of the image sent
    acknowledged: dict[str, str] = field(default_factory=dict)  # prediction id -> label, answered 201/200
    in_doubt: dict[str, str] = field(default_factory=dict)  # feedback sent, no answer: the server died meanwhile
    unexpected: list[str] = field(default_factory=list)  # any other answer while the server was up
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> "Load":
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float = 30.0) -> None:
        for thread in self.threads:
            thread.join(timeout)
            assert not thread.is_alive(), "a client is still talking to a killed server"

    def _client(self, worker: int) -> None:
        with httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
            for first in range(worker * 1_000_000, (worker + 1) * 1_000_000, IMAGES_PER_REQUEST):
                seeds = range(first, first + IMAGES_PER_REQUEST)
                files = [("files", (f"{seed}.png", noise_png(seed), "image/png")) for seed in seeds]
                try:
                    response = http.post("/v1/predict", files=files)
                except httpx.TransportError:
                    return  # killed
                if response.status_code != 200:
                    with self.lock:
                        self.unexpected.append(f"predict {response.status_code}: {response.text[:200]}")
                    return
                ids = [p["prediction_id"] for p in response.json()["predictions"]]
                with self.lock:
                    self.answered.update(zip(ids, seeds, strict=True))
                for prediction_id, seed in zip(ids, seeds, strict=True):
                    body = {"prediction_id": prediction_id, "label": label_of(seed)}
                    try:
                        stored = http.post("/v1/feedback", json=body)
                    except httpx.TransportError:
                        with self.lock:
                            self.in_doubt[prediction_id] = body["label"]
                        return
                    with self.lock:
                        if stored.status_code in (200, 201) and stored.json()["label"] == body["label"]:
                            self.acknowledged[prediction_id] = body["label"]
                        else:
                            self.unexpected.append(f"feedback {stored.status_code}: {stored.text[:200]}")
                            return


@dataclass
class LogState:
    lines: dict[str, dict]  # prediction id -> its record, from the complete batch lines
    batch_files: int
    torn: list[str]  # batch files whose last line is unterminated (or that are empty)
    orphans: list[str]  # prediction ids of images no batch line names (their batch line was never written)
    unreadable_orphans: list[str]


def read_log(root: Path) -> LogState:
    """Every complete batch line parses and names an image that decodes with its record; an unterminated tail is
    collected in `torn`, for the caller to judge."""
    lines: dict[str, dict] = {}
    torn = []
    batch_files = sorted((root / "batches").rglob("*.jsonl"))
    for path in batch_files:
        data = path.read_bytes()
        complete, _, tail = data.rpartition(b"\n")
        if tail or not data:
            torn.append(path.name)
        for number, line in enumerate(complete.splitlines() if complete else [], start=1):
            record = json.loads(line)  # raises on a complete line that is not JSON
            assert set(record) == LOG_FIELDS, f"{path.name}:{number}: {sorted(record)}"
            prediction_id = record["prediction_id"]
            assert PREDICTION_ID_PATTERN.fullmatch(prediction_id) and prediction_id not in lines, (path, number)
            assert record["image"] == LoggedPrediction.image_path(prediction_id)
            image_file = root / record["image"]
            assert image_file.is_file(), f"{path.name}:{number} names {record['image']}, which is not there"
            with Image.open(image_file) as image:
                image.load()  # decodes every pixel: raises on a truncated file
                assert (image.format, image.size, image.mode) == ("PNG", (32, 32), "RGB"), image_file
                assert json.loads(image.text[RECORD_CHUNK]) == record, image_file  # type: ignore[attr-defined]
            lines[prediction_id] = record
    orphans, unreadable = [], []
    for image_file in sorted((root / "images").rglob("*.png")):
        if image_file.stem not in lines:
            orphans.append(image_file.stem)
            try:
                with Image.open(image_file) as image:
                    image.load()
                    json.loads(image.text[RECORD_CHUNK])  # type: ignore[attr-defined]
            except Exception:
                unreadable.append(image_file.stem)
    return LogState(lines, len(batch_files), torn, orphans, unreadable)


def feedback_total(server: Server) -> float:
    text = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": API_KEY}).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("cifarlab_feedback_total")
    )


@pytest.fixture
def env(tiny_model: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "MODEL_URI": str(tiny_model),
        "API_KEY": API_KEY,
        "FEEDBACK_DIR": str(tmp_path / "feedback"),
        "PREDICTION_LOG_URL": str(tmp_path / "predlog"),
        "PREDICTION_LOG_FLUSH_S": "0.05",  # many small writes: the kill lands among them
        "PREDICTION_LOG_BATCH_ITEMS": "16",
        "ORT_INTRA_OP_THREADS": "1",
    }


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.process is not None and server.process.poll() is None:
            server.stop()


def test_sigkill_under_load_loses_no_acknowledged_feedback_and_leaves_a_readable_log(
    env: dict[str, str], tmp_path: Path, servers: list[Server]
) -> None:
    feedback_root, log_root = Path(env["FEEDBACK_DIR"]), Path(env["PREDICTION_LOG_URL"])
    first = Server(env, tmp_path / "server-1.log").start()
    servers.append(first)
    assert first.process is not None
    pid = first.process.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert cmdline[1:3] == [b"-m", b"uvicorn"], cmdline  # the server itself, no shell in between

    load = Load(first.url).start()
    deadline = time.monotonic() + 40
    while len(load.acknowledged) < KILL_AFTER or not list(log_root.glob("batches/*/*.jsonl")):
        assert time.monotonic() < deadline, f"{len(load.acknowledged)} acknowledged in 40 s: {load.unexpected}"
        assert not load.unexpected, load.unexpected
        time.sleep(0.01)
    acknowledged_at_kill = len(load.acknowledged)
    first.signal(signal.SIGKILL)
    assert first.stop() == -signal.SIGKILL
    load.join()
    assert not load.unexpected, load.unexpected
    acknowledged, in_doubt = dict(load.acknowledged), dict(load.in_doubt)

    log = read_log(log_root)  # as the kill left it
    assert len(log.torn) <= 1, f"more than the last write is torn: {log.torn}"
    if log.torn:
        writer_batches = [p.name for p in log_root.glob("batches/*/*.jsonl") if log.torn[0].split("-")[1] in p.name]
        newest = max(writer_batches, key=lambda name: int(name.rsplit("-", 1)[1].removesuffix(".jsonl")))
        assert log.torn == [newest], "a torn batch file that is not the killed writer's last"
    assert log.lines, "the log holds no complete batch"
    # logged but never answered: only the requests in flight at the kill, at most one per client
    assert len(set(log.lines) - set(load.answered)) <= CLIENTS * IMAGES_PER_REQUEST

    second = Server(env, tmp_path / "server-2.log").start()
    servers.append(second)
    ready = httpx.get(f"{second.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text

    # the store on disk: every acknowledged record with its label and its image, nothing never sent
    contents = open_feedback_store(feedback_root).contents()
    assert not contents.unreadable and not contents.torn_bytes  # every record object whole
    records = contents.records
    stored = {record.prediction_id: record for record in records}
    assert len(stored) == len(records), "a prediction stored twice"
    missing = {i: label for i, label in acknowledged.items() if i not in stored}
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged records lost: {list(missing)[:5]}"
    wrong = {i: (label, stored[i].label) for i, label in acknowledged.items() if stored[i].label != label}
    assert not wrong, wrong
    assert set(stored) <= set(acknowledged) | set(in_doubt), "a record stored that no client sent"
    # an image without its record is only ever feedback that was in flight at the kill (renamed into place, its
    # record never created): never acknowledged, and under the label that was sent
    unrecorded = {p.stem: p.parent.name for p in feedback_root.glob("*/*.png") if p.stem not in stored}
    assert all(in_doubt.get(i) == label for i, label in unrecorded.items()), (unrecorded, in_doubt)
    for prediction_id, record in stored.items():
        assert record.path == f"{record.label}/{prediction_id}.png"
        sent = pixels(noise_png(load.answered[prediction_id]))
        with Image.open(feedback_root / record.path) as image:
            np.testing.assert_array_equal(np.asarray(image.convert("RGB")), sent)

    # the live metric counts what this process acknowledged: a restart starts from 0, never counting the store again
    assert len(stored) >= len(acknowledged) and feedback_total(second) == 0

    # the API agrees: the same label again is "already stored", another label conflicts
    with httpx.Client(base_url=second.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        for prediction_id, label in acknowledged.items():
            again = http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label})
            assert again.status_code == 200, (prediction_id, again.text)
            assert (again.json()["label"], again.json()["created"]) == (label, False)
            seed = load.answered[prediction_id]
            assert again.json()["image_index"] == seed % IMAGES_PER_REQUEST
            conflict = http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": other_label(seed)})
            assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflicting_feedback"

        # predictions answered before the kill without acknowledged feedback, and images the log holds without
        # a batch line: the restarted server reads them from the log (201), already has them (200) or never
        # logged them (404) - it never fails on what the kill left behind
        unacknowledged = (set(load.answered) | set(log.orphans)) - set(acknowledged)
        outcomes: dict[int, int] = {}
        for prediction_id in sorted(unacknowledged):
            label = in_doubt.get(prediction_id) or label_of(load.answered.get(prediction_id, 0))
            answer = http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label})
            assert answer.status_code in (200, 201, 404), (prediction_id, answer.status_code, answer.text)
            assert answer.status_code != 404 or prediction_id not in log.lines, "a logged prediction not found"
            outcomes[answer.status_code] = outcomes.get(answer.status_code, 0) + 1

        # and it serves: a new prediction, its feedback
        image = noise_png(7_000_000)
        answer = http.post("/v1/predict", files=[("files", ("new.png", image, "image/png"))])
        assert answer.status_code == 200, answer.text
        new_id = answer.json()["predictions"][0]["prediction_id"]
        assert http.post("/v1/feedback", json={"prediction_id": new_id, "label": "cat"}).status_code == 201
    assert second.stop() in (0, -signal.SIGTERM)

    report = {
        "predictions answered": len(load.answered),
        "acknowledged at the kill signal": acknowledged_at_kill,
        "acknowledged in all": len(acknowledged),
        "feedback in flight (no answer)": len(in_doubt),
        "records after restart": len(stored),
        "log batch files": log.batch_files,
        "log batch lines (images checked)": len(log.lines),
        "torn batch files": log.torn,
        "log images without a batch line": len(log.orphans),
        "unreadable ones": len(log.unreadable_orphans),
        "feedback after restart on unacknowledged predictions (status: count)": outcomes,
        "feedback images without a record (at the restart)": [f"{label}/{i}.png" for i, label in unrecorded.items()],
        "temporary files left": sorted(str(p.relative_to(feedback_root)) for p in feedback_root.rglob(".*")),
    }
    print(json.dumps(report, indent=1))


def test_feedback_after_a_restart_survives_log_images_a_kill_left_torn(
    env: dict[str, str], tmp_path: Path, servers: list[Server]
) -> None:
    """What the kill above can leave and a random kill rarely hits: the log writes each image in place (fsspec's
    local files: open, then write), so a kill in the middle of a batch leaves an empty or truncated PNG that no
    batch line names. Feedback after the restart looks every id up in the log first: for an acknowledged record it
    must still answer 200 "already stored", for a prediction with no feedback 404, never 500."""
    log_root = Path(env["PREDICTION_LOG_URL"])
    first = Server(env, tmp_path / "server-1.log").start()
    servers.append(first)
    headers = {"X-API-Key": API_KEY}
    with httpx.Client(base_url=first.url, headers=headers, timeout=30) as http:
        files = [("files", (f"{seed}.png", noise_png(seed), "image/png")) for seed in range(4)]
        answer = http.post("/v1/predict", files=files)
        assert answer.status_code == 200, answer.text
        ids = [p["prediction_id"] for p in answer.json()["predictions"]]
        acknowledged = {ids[0]: label_of(0), ids[1]: label_of(1)}  # ids[2], ids[3]: answered, no feedback
        for prediction_id, label in acknowledged.items():
            stored = http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label})
            assert stored.status_code == 201, stored.text
    deadline = time.monotonic() + 30
    while not all((log_root / LoggedPrediction.image_path(i)).is_file() for i in ids):
        assert time.monotonic() < deadline, "the log never wrote the images"
        time.sleep(0.05)
    first.signal(signal.SIGKILL)
    assert first.stop() == -signal.SIGKILL
    for prediction_id, keep in zip(ids, (0, 0.5, 0, 0.5), strict=True):  # as a kill mid-write leaves them
        image_file = log_root / LoggedPrediction.image_path(prediction_id)
        image_file.write_bytes(image_file.read_bytes()[: int(keep * image_file.stat().st_size)])
    for batch in log_root.glob("batches/*/*.jsonl"):  # the kill came before the batch line
        batch.unlink()

    second = Server(env, tmp_path / "server-2.log").start()
    servers.append(second)

    def feedback(prediction_id: str, label: str) -> int | str:
        try:  # a connection of its own: one failure cannot spill onto the next request
            answer = httpx.post(
                f"{second.url}/v1/feedback", json={"prediction_id": prediction_id, "label": label}, headers=headers
            )
        except httpx.TransportError as error:
            return f"no answer: {error}"
        return answer.status_code

    statuses = {
        "no feedback, log image empty": feedback(ids[2], "cat"),
        "no feedback, log image truncated": feedback(ids[3], "cat"),
        "acknowledged, log image empty, sent again": feedback(ids[0], acknowledged[ids[0]]),
        "acknowledged, log image truncated, sent again": feedback(ids[1], acknowledged[ids[1]]),
        "acknowledged, log image empty, another label": feedback(ids[0], other_label(0)),
    }
    expected = [404, 404, 200, 200, 409]
    assert list(statuses.values()) == expected, json.dumps(statuses, indent=1)
    assert httpx.get(f"{second.url}/readyz").status_code == 200
