"""Feedback keyed by server-issued prediction ids, against the real server: clients that share (or spoof) an
X-Request-ID cannot touch each other's predictions, and acknowledged feedback survives a restart whatever else
the manifest holds (a line from a newer server, a line that does not parse, a torn tail)."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cifarlab_contract.feedback import MANIFEST_FILE, PREDICTION_ID_PATTERN
from tests.serve.conftest import API_KEY, Server, noise_png

pytestmark = pytest.mark.integration  # a real uvicorn server on loopback


@pytest.fixture
def feedback_server(tiny_model: Path, tmp_path: Path) -> Iterator[Server]:
    env = {"MODEL_URI": str(tiny_model), "FEEDBACK_DIR": str(tmp_path / "feedback"), "API_KEY": API_KEY}
    server = Server(env, tmp_path / "server.log").start()
    yield server
    server.stop()


def predict(server: Server, image: bytes, request_id: str) -> dict:
    response = httpx.post(
        f"{server.url}/v1/predict",
        files=[("files", ("image.png", image, "image/png"))],
        headers={"X-API-Key": API_KEY, "X-Request-ID": request_id},
    )
    response.raise_for_status()
    return response.json()


def feedback(server: Server, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/feedback", json=body, headers={"X-API-Key": API_KEY})


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_two_clients_with_one_request_id_each_store_their_own_image(feedback_server: Server) -> None:
    root = Path(feedback_server.env["FEEDBACK_DIR"])
    first_image, second_image = noise_png(1), noise_png(2)
    first = predict(feedback_server, first_image, "shared-id")
    second = predict(feedback_server, second_image, "shared-id")  # another client, the same X-Request-ID
    assert first["request_id"] == second["request_id"] == "shared-id"  # still correlates the logs
    first_id, second_id = first["predictions"][0]["prediction_id"], second["predictions"][0]["prediction_id"]
    assert first_id != second_id and all(PREDICTION_ID_PATTERN.fullmatch(i) for i in (first_id, second_id))

    assert feedback(feedback_server, {"prediction_id": first_id, "label": "cat"}).status_code == 201
    assert feedback(feedback_server, {"prediction_id": second_id, "label": "dog"}).status_code == 201
    np.testing.assert_array_equal(np.asarray(Image.open(root / "cat" / f"{first_id}.png")), pixels(first_image))
    np.testing.assert_array_equal(np.asarray(Image.open(root / "dog" / f"{second_id}.png")), pixels(second_image))

    manifest, images = (root / MANIFEST_FILE).read_bytes(), sorted(root.rglob("*.png"))
    conflict = feedback(feedback_server, {"prediction_id": first_id, "label": "ship"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflicting_feedback"
    never_issued = feedback(feedback_server, {"prediction_id": "0123456789abcdef" * 2, "label": "cat"})
    assert never_issued.status_code == 404 and never_issued.json()["error"]["code"] == "unknown_prediction"
    removed = feedback(feedback_server, {"request_id": "shared-id", "label": "cat", "image_index": 0})
    assert removed.status_code == 422 and "prediction_id" in removed.json()["error"]["message"]
    assert (root / MANIFEST_FILE).read_bytes() == manifest and sorted(root.rglob("*.png")) == images  # unchanged
    records = [json.loads(line) for line in manifest.splitlines()]
    assert [(r["prediction_id"], r["request_id"], r["label"]) for r in records] == [
        (first_id, "shared-id", "cat"),
        (second_id, "shared-id", "dog"),
    ]


def test_a_restart_finds_every_acknowledged_record_beside_newer_and_unreadable_lines(feedback_server: Server) -> None:
    root = Path(feedback_server.env["FEEDBACK_DIR"])
    labels = ["cat", "dog", "ship", "frog"]
    acknowledged = {}
    for seed, label in enumerate(labels):
        prediction_id = predict(feedback_server, noise_png(seed), f"r{seed}")["predictions"][0]["prediction_id"]
        stored = feedback(feedback_server, {"prediction_id": prediction_id, "label": label})
        assert stored.status_code == 201
        acknowledged[prediction_id] = stored.json()
    feedback_server.stop()

    manifest = root / MANIFEST_FILE
    lines = manifest.read_bytes().splitlines(keepends=True)
    newer = json.loads(lines[1]) | {"embedding": [0.1, 0.2], "reviewer": "someone"}  # a newer server's fields
    lines[1] = (json.dumps(newer) + "\n").encode()
    lines.insert(2, b"not json: a line this version cannot read\n")
    kept = b"".join(lines)
    manifest.write_bytes(kept + b'{"prediction_id": "torn", "lab')  # a crash in the middle of an append
    feedback_server.start()

    for prediction_id, record in acknowledged.items():  # each is found: the same feedback again is a 200
        again = feedback(feedback_server, {"prediction_id": prediction_id, "label": record["label"]})
        assert again.status_code == 200 and again.json() == {**record, "created": False}
        other = "airplane" if record["label"] != "airplane" else "cat"
        assert feedback(feedback_server, {"prediction_id": prediction_id, "label": other}).status_code == 409
    assert manifest.read_bytes() == kept  # the torn tail is cut, nothing else
    warnings = [e for e in feedback_server.json_logs() if "skipped" in e["message"]]
    assert [e["lines"] for e in warnings] == [[3]] and warnings[0]["level"] == "warning"
