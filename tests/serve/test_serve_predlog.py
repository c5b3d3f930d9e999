"""The prediction log and the feedback store shared by replicas, on the GCS emulator: two real server processes
log every answer to one gs:// log, feedback sent to the replica that did not answer is found there and stored once
in one gs:// feedback store, byte-identical; a log write that fails is counted and never fails a prediction."""

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from cifarlab_contract.feedback import parse_record
from serve.model import ModelLoadError
from serve.predlog import LoggedPrediction, PredictionLog
from serve.service import Service
from serve.settings import Settings
from tests.serve.conftest import API_KEY, Server, noise_png, wait_until
from tests.servers import BUCKET, GCS_ENV

pytestmark = pytest.mark.integration  # real servers on loopback and the GCS emulator

PREDICTIONS = 200  # 1,000 did not finish within 5 minutes here: the emulator serves one request at a time


@pytest.fixture
def replicas(tiny_model: Path, tmp_path: Path, gcs) -> Iterator[list[Server]]:
    gcs.wipe()
    options = json.dumps({"endpoint_url": gcs.url, "token": "anon"})
    servers = []
    for name in ("a", "b"):
        env = {
            **GCS_ENV,
            "MODEL_URI": str(tiny_model),
            "API_KEY": API_KEY,
            "FEEDBACK_DIR": f"gs://{BUCKET}/feedback-{tmp_path.name}",  # the only state the replicas share
            "FEEDBACK_OPTIONS": options,
            "PREDICTION_LOG_URL": f"gs://{BUCKET}/predlog-{tmp_path.name}",
            "PREDICTION_LOG_OPTIONS": options,
            "PREDICTION_LOG_FLUSH_S": "0.2",
        }
        servers.append(Server(env, tmp_path / f"server-{name}.log").start())
    yield servers
    for server in servers:
        server.stop()


def metric(server: Server, name: str, labels: str = "") -> float:
    """A metric's value on one replica: the sample `name` or `name{labels}`."""
    text = httpx.get(f"{server.url}/metrics", headers={"X-API-Key": API_KEY}).text
    wanted = f"{name}{{{labels}}} " if labels else f"{name} "
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(wanted))


def test_feedback_sent_to_the_other_replica_is_found_in_the_shared_log(replicas: list[Server], gcs) -> None:
    answered = []  # (replica index, prediction id, the image sent)
    headers = {"X-API-Key": API_KEY}
    for server in replicas:
        assert httpx.get(f"{server.url}/readyz").json()["prediction_log"] == "logging"
        assert metric(server, "cifarlab_prediction_log_available") == 1
    for i in range(PREDICTIONS):  # round-robin
        server, image = replicas[i % 2], noise_png(1000 + i)
        response = httpx.post(f"{server.url}/v1/predict", files=[("files", ("x.png", image))], headers=headers)
        response.raise_for_status()
        answered.append((i % 2, response.json()["predictions"][0]["prediction_id"], image))
    wait_until(
        lambda: sum(metric(s, "cifarlab_prediction_log_written_total") for s in replicas) >= PREDICTIONS,
        "both replicas wrote their batches",
        timeout=240,  # the emulator takes one request at a time: about 10 ms an image here
    )
    labels, correct = ["cat", "dog", "ship", "frog"], 0
    for i, (index, prediction_id, _) in enumerate(answered):
        other = replicas[1 - index]  # the replica that never saw this prediction
        body = {"prediction_id": prediction_id, "label": labels[i % 4]}
        stored = httpx.post(f"{other.url}/v1/feedback", json=body, headers=headers)
        assert stored.status_code == 201, stored.text
        assert stored.json()["request_id"] and stored.json()["image_index"] == 0
        correct += stored.json()["correct"]
    for outcome, expected in (("true", correct), ("false", PREDICTIONS - correct)):  # both replicas add up
        series = f'correct="{outcome}",variant="default"'
        assert sum(metric(s, "cifarlab_feedback_total", series) for s in replicas) == expected

    prefix = replicas[0].env["FEEDBACK_DIR"].removeprefix(f"gs://{BUCKET}/")
    names = [name.removeprefix(f"{prefix}/") for name in gcs.objects() if name.startswith(f"{prefix}/")]
    records = [parse_record(gcs.read(f"{prefix}/{name}")) for name in names if name.startswith("records/")]
    assert sorted(r.prediction_id for r in records) == sorted(p for _, p, _ in answered)  # each stored once
    for i, (_, prediction_id, image) in enumerate(answered):
        stored_image = np.asarray(Image.open(io.BytesIO(gcs.read(f"{prefix}/{labels[i % 4]}/{prediction_id}.png"))))
        np.testing.assert_array_equal(stored_image, np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
    assert len([name for name in names if name.endswith(".png")]) == PREDICTIONS
    for index, prediction_id, _ in answered:  # either replica finds what the other stored
        again = httpx.post(
            f"{replicas[index].url}/v1/feedback",
            json={"prediction_id": prediction_id, "label": "truck"},
            headers=headers,
        )
        assert again.status_code == 409 and again.json()["error"]["code"] == "conflicting_feedback"
    batch_lines = [name for name in gcs.objects() if "/batches/" in name]
    assert batch_lines and sum(metric(s, "cifarlab_prediction_log_failed_total") for s in replicas) == 0


def test_a_failing_log_write_is_counted_and_never_raises(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    log = PredictionLog(str(tmp_path / "log"), registry, flush_s=0.05)
    log.open()
    (tmp_path / "log" / "images").write_text("a file where the images folder goes: every write fails")
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    for i in range(3):
        prediction_id = f"{i:032x}"
        path = LoggedPrediction.image_path(prediction_id)
        entry = LoggedPrediction(prediction_id, "r", 0, "t", "v", "m", "1", "run", "cat", 0.5, {"cat": 0.5}, path)
        log.add(entry, image)  # never raises
    log.close()
    assert registry.get_sample_value("cifarlab_prediction_log_failed_total") == 3
    assert registry.get_sample_value("cifarlab_prediction_log_written_total") == 0


def test_a_log_store_that_cannot_be_written_stops_the_start_with_one_reason(tiny_model: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder would go")
    service = Service(Settings(model_uri=str(tiny_model), prediction_log_url=str(blocker / "log")))
    with pytest.raises(ModelLoadError, match=f"prediction log {blocker / 'log'} is not writable"):
        asyncio.run(service.start())
    assert service.prediction_log is None  # nothing half-open is left to write to


def test_a_best_effort_log_that_cannot_be_written_serves_without_it_and_says_so(
    tiny_model: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log's folder would go")
    env = {
        "MODEL_URI": str(tiny_model),
        "API_KEY": API_KEY,
        "PREDICTION_LOG_URL": str(blocker / "log"),
        "PREDICTION_LOG_REQUIRED": "false",
    }
    server = Server(env, tmp_path / "server.log").start()
    try:
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 200 and ready.json()["prediction_log"] == "unavailable"
        answer = httpx.post(
            f"{server.url}/v1/predict",
            files={"files": ("a.png", noise_png(1), "image/png")},
            headers={"X-API-Key": API_KEY},
        )
        assert answer.status_code == 200 and answer.json()["predictions"][0]["prediction_id"]
        assert metric(server, "cifarlab_prediction_log_available") == 0
        assert metric(server, "cifarlab_prediction_log_written_total") == 0
        (warning,) = [line for line in server.json_logs() if "prediction log unavailable" in line.get("message", "")]
        assert (
            warning["level"] == "warning" and f"prediction log {blocker / 'log'} is not writable" in warning["reason"]
        )
    finally:
        server.stop()
    assert not (blocker.parent / "log").exists()
