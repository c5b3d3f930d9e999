"""The prediction log shared by replicas, on the GCS emulator: two real server processes log every answer to one
gs:// log, feedback sent to the replica that did not answer is found there and stored once, byte-identical; a log
write that fails is counted and never fails a prediction."""

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

from serve.model import ModelLoadError
from serve.predlog import LoggedPrediction, PredictionLog
from serve.service import Service
from serve.settings import Settings
from tests.serve.conftest import API_KEY, Server, noise_png, wait_until
from tests.servers import BUCKET, GCS_ENV

pytestmark = pytest.mark.integration  # real servers on loopback and the GCS emulator

PREDICTIONS = 40


@pytest.fixture
def replicas(tiny_model: Path, tmp_path: Path, gcs) -> Iterator[list[Server]]:
    gcs.wipe()
    log_url = f"gs://{BUCKET}/predlog-{tmp_path.name}"
    servers = []
    for name in ("a", "b"):
        env = {
            **GCS_ENV,
            "MODEL_URI": str(tiny_model),
            "API_KEY": API_KEY,
            "FEEDBACK_DIR": str(tmp_path / f"feedback-{name}"),  # each replica's own feedback store
            "PREDICTION_LOG_URL": log_url,
            "PREDICTION_LOG_OPTIONS": json.dumps({"endpoint_url": gcs.url, "token": "anon"}),
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
    for i in range(PREDICTIONS):  # round-robin
        server, image = replicas[i % 2], noise_png(1000 + i)
        response = httpx.post(f"{server.url}/v1/predict", files=[("files", ("x.png", image))], headers=headers)
        response.raise_for_status()
        answered.append((i % 2, response.json()["predictions"][0]["prediction_id"], image))
    wait_until(
        lambda: sum(metric(s, "cifarlab_prediction_log_written_total") for s in replicas) >= PREDICTIONS,
        "both replicas wrote their batches",
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

    for i, (index, prediction_id, image) in enumerate(answered):
        root = Path(replicas[1 - index].env["FEEDBACK_DIR"])
        stored_image = np.asarray(Image.open(root / labels[i % 4] / f"{prediction_id}.png"))
        np.testing.assert_array_equal(stored_image, np.asarray(Image.open(io.BytesIO(image)).convert("RGB")))
    manifests = [Path(s.env["FEEDBACK_DIR"]) / "manifest.jsonl" for s in replicas]
    ids = [json.loads(line)["prediction_id"] for m in manifests for line in m.read_text().splitlines()]
    assert sorted(ids) == sorted(p for _, p, _ in answered)  # each stored exactly once
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
