"""Feedback keyed by server-issued prediction ids, against the real server: clients that share (or spoof) an
X-Request-ID cannot touch each other's predictions, and acknowledged feedback survives a restart whatever else
the store holds (records from a newer server, an older store's manifest with a line that does not parse and a
torn tail)."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cifarlab_contract.feedback import MANIFEST_FILE, PREDICTION_ID_PATTERN, record_path
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


def store_files(root: Path) -> dict[str, bytes]:
    """Every file of the feedback store, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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

    before = store_files(root)
    conflict = feedback(feedback_server, {"prediction_id": first_id, "label": "ship"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflicting_feedback"
    never_issued = feedback(feedback_server, {"prediction_id": "0123456789abcdef" * 2, "label": "cat"})
    assert never_issued.status_code == 404 and never_issued.json()["error"]["code"] == "unknown_prediction"
    removed = feedback(feedback_server, {"request_id": "shared-id", "label": "cat", "image_index": 0})
    assert removed.status_code == 422 and "prediction_id" in removed.json()["error"]["message"]
    assert store_files(root) == before  # unchanged
    records = [json.loads(before[record_path(i)]) for i in (first_id, second_id)]
    assert [(r["prediction_id"], r["request_id"], r["label"]) for r in records] == [
        (first_id, "shared-id", "cat"),
        (second_id, "shared-id", "dog"),
    ]
    assert sorted(before) == sorted(
        [f"cat/{first_id}.png", f"dog/{second_id}.png", *map(record_path, [first_id, second_id])]
    )


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

    # two records as an older server kept them, in its manifest: one line from a newer server (fields this version
    # does not know), one that does not parse, a torn tail; the other two stay record objects, one with new fields
    ids = list(acknowledged)
    legacy = [(root / record_path(i)).read_bytes() for i in ids[:2]]
    for prediction_id in ids[:2]:
        (root / record_path(prediction_id)).unlink()
    legacy[1] = (json.dumps(json.loads(legacy[1]) | {"embedding": [0.1, 0.2]}) + "\n").encode()
    (root / MANIFEST_FILE).write_bytes(
        legacy[0] + b"not json: a line this version cannot read\n" + legacy[1] + b'{"tor'
    )
    newer = root / record_path(ids[2])
    newer.write_text(json.dumps(json.loads(newer.read_text()) | {"reviewer": "someone"}))
    kept = store_files(root)
    feedback_server.start()

    for prediction_id, record in acknowledged.items():  # each is found: the same feedback again is a 200
        again = feedback(feedback_server, {"prediction_id": prediction_id, "label": record["label"]})
        assert again.status_code == 200 and again.json() == {**record, "created": False}
        other = "airplane" if record["label"] != "airplane" else "cat"
        assert feedback(feedback_server, {"prediction_id": prediction_id, "label": other}).status_code == 409
    assert store_files(root) == kept  # nothing rewritten, nothing cut
    warnings = [e for e in feedback_server.json_logs() if "skipped" in e["message"]]
    assert [e["lines"] for e in warnings] == [[2]] and warnings[0]["level"] == "warning"
