"""The API through a real uvicorn server: predictions, parity with the training code, metadata, metrics, logs,
and every client mistake answered with a 4xx and a JSON error body."""

import base64
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cifarlab.data.prepare import decode_image
from cifarlab.evaluate import _torch_logits
from cifarlab.export.onnx import onnx_logits, onnx_session, read_metadata
from cifarlab.models.module import ImageClassifier
from cifarlab_contract.classes import CIFAR10_CLASSES
from tests.serve.conftest import API_KEY

pytestmark = pytest.mark.slow  # the session's trained model, served by uvicorn


def png(size: tuple[int, int] = (32, 32), color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def files(*blobs: bytes) -> list:
    return [("files", (f"{i}.png", blob, "application/octet-stream")) for i, blob in enumerate(blobs)]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def test_predict_multipart_answers_per_image_with_model_and_request_id(client, test_images, onnx_model):
    jpeg = test_images[0][2]
    response = client.post("/v1/predict", files=files(jpeg, png()), headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["request_id"] == "req-42" == response.headers["x-request-id"]
    assert body["variant"] == "default" == response.headers["x-model-variant"]
    metadata = read_metadata(onnx_model)
    assert body["model"]["run_id"] == metadata["run_id"] and len(body["model"]["version"]) == 12
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        assert prediction["label"] == CIFAR10_CLASSES[prediction["class_index"]]
        assert len(prediction["top_k"]) == 3 and prediction["top_k"][0]["label"] == prediction["label"]
        probabilities = [entry["probability"] for entry in prediction["top_k"]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1
        assert prediction["confidence"] == probabilities[0]
    assert [p["filename"] for p in body["predictions"]] == ["0.png", "1.png"]
    ids = [p["prediction_id"] for p in body["predictions"]]  # issued by the server, one per image
    assert len(set(ids)) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


def test_server_probabilities_equal_the_training_code_on_real_test_images(client, test_images, tiny_run):
    """Parity: the bytes a user uploads give what the training side computes for the same test images."""
    blobs = [jpeg for _, _, jpeg in test_images]
    served = []
    for start in range(0, len(blobs), 8):
        response = client.post("/v1/predict", params={"top_k": 10}, files=files(*blobs[start : start + 8]))
        assert response.status_code == 200, response.text
        for prediction in response.json()["predictions"]:
            row = np.zeros(10)
            for entry in prediction["top_k"]:
                row[entry["class_index"]] = entry["probability"]
            served.append(row)
    served = np.array(served)
    # the training side: its decoder, then its evaluation path (ONNX) and the PyTorch checkpoint
    images = np.stack([decode_image(blob, name) for _, name, blob in test_images])
    onnx_probabilities = torch.softmax(torch.from_numpy(onnx_logits(onnx_session(tiny_run / "model.onnx"), images)), 1)
    module = ImageClassifier.load_from_checkpoint(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu")
    torch_probabilities = torch.softmax(torch.from_numpy(_torch_logits(module, images, 64)), 1)
    assert np.abs(served - onnx_probabilities.numpy()).max() <= 1e-4
    assert np.abs(served - torch_probabilities.numpy()).max() <= 1e-4
    assert served.sum(axis=1) == pytest.approx(1.0, abs=1e-5)
    assert served.max() - served.min() > 0.01  # a trained model, not a constant


def test_predict_json_base64_equals_multipart(client, test_images):
    _, _, jpeg = test_images[5]
    encoded = base64.b64encode(jpeg).decode()
    as_json = client.post("/v1/predict", json={"images": [encoded, f"data:image/jpeg;base64,{encoded}"]})
    as_file = client.post("/v1/predict", files=files(jpeg))
    assert as_json.status_code == as_file.status_code == 200
    first, second = as_json.json()["predictions"]
    assert first["top_k"] == second["top_k"] == as_file.json()["predictions"][0]["top_k"]
    assert first["filename"] is None


def test_non_32x32_and_grayscale_images_are_accepted(client):
    gray = io.BytesIO()
    Image.new("L", (300, 200), 128).save(gray, format="JPEG")
    response = client.post("/v1/predict", files=files(gray.getvalue(), png((64, 64))))
    assert response.status_code == 200 and len(response.json()["predictions"]) == 2


def test_model_endpoint_describes_the_onnx_file(client, onnx_model):
    import hashlib

    body = client.get("/v1/model").json()
    metadata = read_metadata(onnx_model)
    assert body["sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert body["version"] == body["sha256"][:12] and body["name"] == "cifarlab"
    assert body["classes"] == list(CIFAR10_CLASSES) and body["run_id"] == metadata["run_id"]
    assert body["input_spec"] == json.loads(metadata["input_spec"]) and body["uri"] == str(onnx_model)


def test_feedback_and_drift_without_their_configuration(client):
    feedback = client.post("/v1/feedback", json={"prediction_id": "ab" * 16, "label": "cat"})
    assert feedback.status_code == 404 and feedback.json()["error"]["code"] == "feedback_disabled"
    assert "FEEDBACK_DIR" in feedback.json()["error"]["message"]
    drift = client.get("/v1/drift").json()["variants"]["default"]  # the session's model carries its reference
    assert drift["status"] in {"insufficient_data", "ok", "drift"} and drift["window"] == 200


def test_health_and_readiness_need_no_key(server):
    assert httpx.get(f"{server.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz").json() == {"status": "ready"}


def test_metrics_use_the_agreed_names_and_count_requests(client, server, onnx_model):
    client.post("/v1/predict", files=files(png(), png(), png()))
    client.post("/v1/predict", files=files(b"not an image"))
    text = httpx.get(f"{server.url}/metrics").text
    run_id = read_metadata(onnx_model)["run_id"]
    for expected in (
        'cifarlab_http_requests_total{method="POST",route="/v1/predict",status="200",variant="default"}',
        'cifarlab_http_requests_total{method="POST",route="/v1/predict",status="422",variant="default"}',
        'cifarlab_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/predict",variant="default"}',
        "cifarlab_http_requests_in_flight 1.0",  # this scrape itself
        'cifarlab_batch_size_bucket{le="4.0",variant="default"}',
        'cifarlab_inference_duration_seconds_count{variant="default"}',
        'cifarlab_prediction_confidence_count{variant="default"}',
        'cifarlab_model_ready{variant="default"} 1.0',
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert expected in text, expected
    assert f'run_id="{run_id}"' in text and "cifarlab_model_info{" in text
    predictions = [line for line in text.splitlines() if line.startswith("cifarlab_predictions_total{")]
    assert predictions and all('variant="default"' in line for line in predictions)
    assert sum(float(line.rsplit(" ", 1)[1]) for line in predictions) >= 3


def test_a_scrape_right_after_an_answer_counts_its_batch(client, server):
    # the batch's bookkeeping runs after its answers are sent, but before the server reads another request
    def counted() -> tuple[float, ...]:
        # summed, so 0 before the session server's first prediction, when a labelled series does not exist yet
        lines = httpx.get(f"{server.url}/metrics").text.splitlines()
        return tuple(
            sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))
            for prefix in ("cifarlab_predictions_total{", 'cifarlab_prediction_confidence_count{variant="default"}')
        )

    before = counted()
    for images in (3, 1, 2):
        assert client.post("/v1/predict", files=files(*[png()] * images)).status_code == 200
        after = counted()
        assert (after[0] - before[0], after[1] - before[1]) == (images, images)
        before = after


def test_one_json_log_line_per_request_with_id_label_and_latency(client, server):
    response = client.post("/v1/predict", files=files(png()), headers={"X-Request-ID": "log-check-1"})
    label = response.json()["predictions"][0]["label"]
    deadline = time.monotonic() + 5
    while not (lines := [e for e in server.json_logs() if e.get("request_id") == "log-check-1"]):
        assert time.monotonic() < deadline, server.log()[-2000:]
        time.sleep(0.05)
    (entry,) = lines
    assert entry["route"] == "/v1/predict" and entry["status"] == 200 and entry["method"] == "POST"
    assert entry["labels"] == [label] and 0 < entry["confidences"][0] <= 1
    assert entry["latency_ms"] > 0 and entry["model_version"] == response.json()["model"]["version"]


def test_a_generated_request_id_is_returned_when_none_or_a_bad_one_is_given(client):
    for headers in ({}, {"X-Request-ID": "far-too-long" * 20}, {"X-Request-ID": "no/slashes"}):
        response = client.get("/v1/model", headers=headers)
        assert len(response.headers["x-request-id"]) == 32


# --- every client mistake: a 4xx with a JSON body --------------------------------------------------------------


def test_missing_and_wrong_api_keys_are_refused(server):
    assert_error(httpx.post(f"{server.url}/v1/predict", files=files(png())), 401, "missing_api_key")
    wrong = {"X-API-Key": API_KEY[:-1] + "x"}
    assert_error(httpx.post(f"{server.url}/v1/predict", files=files(png()), headers=wrong), 401, "invalid_api_key")
    assert_error(httpx.get(f"{server.url}/v1/model", headers=wrong), 401, "invalid_api_key")


@pytest.mark.parametrize(
    ("blob", "code"),
    [(b"", "empty_image"), (b"GIF89a\x00\x00garbage", "invalid_image"), (b"hello", "invalid_image")],
)
def test_bad_files_are_422(client, blob, code):
    assert_error(client.post("/v1/predict", files=files(png(), blob)), 422, code)


def test_truncated_jpeg_is_422(client, test_images):
    jpeg = test_images[0][2]
    assert_error(client.post("/v1/predict", files=files(jpeg[: len(jpeg) // 2])), 422, "invalid_image")


def test_decompression_bomb_is_413(client):
    bomb = io.BytesIO()
    Image.new("1", (5000, 5000)).save(bomb, format="PNG")  # 25 Mpx in a few kB; the server allows 1 Mpx
    body = assert_error(client.post("/v1/predict", files=files(bomb.getvalue())), 413, "image_too_large")
    assert "at most 1048576 pixels" in body["error"]["message"]


def test_too_many_images_is_422(client):
    assert_error(client.post("/v1/predict", files=files(*[png()] * 9)), 422, "too_many_images")
    assert_error(
        client.post("/v1/predict", json={"images": [base64.b64encode(png()).decode()] * 9}), 422, "too_many_images"
    )


def test_no_images_is_422(client):
    assert_error(client.post("/v1/predict", json={"images": []}), 422, "invalid_request")
    assert_error(client.post("/v1/predict", files={"other": ("a.png", png())}), 422, "no_images")
    assert_error(
        client.post("/v1/predict", data={"files": "text, not a file"}, files=files(png())), 422, "invalid_request"
    )


def test_wrong_content_type_is_415(client):
    assert_error(
        client.post("/v1/predict", content=png(), headers={"Content-Type": "image/png"}), 415, "unsupported_media_type"
    )
    assert_error(client.post("/v1/predict", content=b"x"), 415, "unsupported_media_type")


def test_malformed_json_and_base64(client):
    headers = {"Content-Type": "application/json"}
    assert_error(client.post("/v1/predict", content=b'{"images": [', headers=headers), 400, "invalid_json")
    assert_error(client.post("/v1/predict", json={"images": "abc"}), 422, "invalid_request")
    assert_error(client.post("/v1/predict", json={"pictures": []}), 422, "invalid_request")
    assert_error(client.post("/v1/predict", json={"images": ["@@not base64@@"]}), 422, "invalid_base64")


def test_broken_multipart_is_a_4xx(client):
    no_boundary = {"Content-Type": "multipart/form-data"}
    assert_error(client.post("/v1/predict", content=b"--xyz\r\n", headers=no_boundary), 400, "invalid_multipart")
    xyz = {"Content-Type": "multipart/form-data; boundary=xyz"}
    assert_error(client.post("/v1/predict", content=b"--xyz\r\nbroken", headers=xyz), 400, "invalid_multipart")
    assert_error(client.post("/v1/predict", content=b"--xyz--\r\n", headers=xyz), 422, "no_images")


def test_multipart_parts_are_read_as_the_form_says(client):
    """Only the `files` field is classified, in order, with its file names (UTF-8); uploads in other fields and
    plain fields are dropped, but every upload counts against the per-request limit (8 here)."""
    named = [("files", ("chat-é.png", png(), "image/png")), ("note", (None, "a plain field")), *files(png())]
    response = client.post("/v1/predict", files=[*named, ("other", ("x.png", png(), "image/png"))])
    assert response.status_code == 200, response.text
    assert [p["filename"] for p in response.json()["predictions"]] == ["chat-é.png", "0.png"]
    others = [("other", (f"{i}.png", png(), "image/png")) for i in range(8)]
    assert_error(client.post("/v1/predict", files=[*files(png()), *others]), 422, "too_many_images")


def test_a_part_without_a_name_is_400(client):
    body = b'--xyz\r\nContent-Disposition: form-data; filename="a.png"\r\n\r\n' + png() + b"\r\n--xyz--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    assert_error(client.post("/v1/predict", content=body, headers=headers), 400, "invalid_multipart")


def test_bad_query_parameter_is_422(client):
    assert_error(client.post("/v1/predict", params={"top_k": "zero"}, files=files(png())), 422, "invalid_request")
    assert_error(client.post("/v1/predict", params={"top_k": 0}, files=files(png())), 422, "invalid_request")


def test_body_over_the_limit_is_413_with_content_length(client):
    big = png() + b"\0" * (300 * 1024)
    assert_error(client.post("/v1/predict", files=files(big)), 413, "body_too_large")


def test_body_over_the_limit_is_413_when_chunked_without_content_length(server):
    """A client that streams without Content-Length cannot slip past the limit."""
    chunks = [b"x" * 65536] * 8  # 512 KiB against a 256 KiB limit

    def stream():
        yield b'{"images": ["'
        yield from chunks

    response = httpx.post(
        f"{server.url}/v1/predict",
        content=stream(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"},
        timeout=30,
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, "body_too_large")


def test_admin_reload_needs_the_key(server):
    assert_error(httpx.post(f"{server.url}/v1/admin/reload"), 401, "missing_api_key")


def test_unknown_route_and_method_are_json_errors(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_server_survives_all_of_the_above(client, server):
    assert server.process.poll() is None
    assert client.post("/v1/predict", files=files(png())).status_code == 200
    assert "Traceback" not in server.log()
