"""Reload without downtime (admin call and SIGHUP), a failed reload that keeps the old model, graceful SIGTERM."""

import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import onnx
import pytest

from tests.serve.conftest import API_KEY, CLEAN_EXIT, Server
from tests.serve.test_serve_api import assert_error, files, png


def relabelled(source: Path, target: Path, run_id: str) -> Path:
    """The same network with another run id: another file, another sha256, visibly another model."""
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == "run_id":
            prop.value = run_id
    onnx.save(model, str(target))
    return target


@pytest.fixture(scope="module")
def models(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    served = folder / "served.onnx"
    shutil.copy(onnx_model, served)
    broken = folder / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    return {
        "served": served,
        "original": onnx_model,
        "second": relabelled(onnx_model, folder / "second.onnx", "run-second"),
        "third": relabelled(onnx_model, folder / "third.onnx", "run-third"),
        "broken": broken,
    }


@pytest.fixture(scope="module")
def reloading_server(models, tmp_path_factory):
    env = {"MODEL_URI": str(models["served"]), "API_KEY": API_KEY, "MAX_WAIT_MS": "1"}
    running = Server(env, tmp_path_factory.mktemp("reload") / "server.log").start()
    yield running
    running.stop()


def run_id(server: Server) -> str:
    return httpx.get(f"{server.url}/v1/model", headers={"X-API-Key": API_KEY}).json()["run_id"]


def reload(server: Server, uri: Path | None = None) -> httpx.Response:
    body = {"model_uri": str(uri)} if uri else None
    return httpx.post(f"{server.url}/v1/admin/reload", json=body, headers={"X-API-Key": API_KEY}, timeout=60)


class Traffic:
    """Predictions in a loop on another thread; every answer recorded."""

    def __init__(self, server: Server) -> None:
        self.server, self.statuses, self.run_ids = server, [], set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
            while not self._stop.is_set():
                response = client.post("/v1/predict", files=files(png()))
                self.statuses.append(response.status_code)
                if response.status_code == 200:
                    self.run_ids.add(response.json()["model"]["run_id"])

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_admin_reload_swaps_models_while_requests_keep_succeeding(reloading_server, models):
    original = run_id(reloading_server)
    with Traffic(reloading_server) as traffic:
        time.sleep(0.2)
        response = reload(reloading_server, models["second"])
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["previous"]["run_id"] == original and body["model"]["run_id"] == "run-second"
    assert run_id(reloading_server) == "run-second"
    assert len(traffic.statuses) > 5 and set(traffic.statuses) == {200}
    assert traffic.run_ids == {original, "run-second"}  # served by both, never failed in between


@pytest.mark.slow
def test_failed_reload_keeps_the_old_model_and_says_why(reloading_server, models):
    before = run_id(reloading_server)
    body = assert_error(reload(reloading_server, models["broken"]), 422, "model_load_failed")
    assert str(models["broken"]) in body["error"]["message"]
    body = assert_error(reload(reloading_server, Path("/nonexistent/model.onnx")), 422, "model_load_failed")
    assert "not found" in body["error"]["message"]
    assert run_id(reloading_server) == before
    assert httpx.get(f"{reloading_server.url}/readyz").status_code == 200
    metrics = httpx.get(f"{reloading_server.url}/metrics").text
    assert 'cifarlab_model_reloads_total{result="failure",variant="default"} 2.0' in metrics


@pytest.mark.slow
def test_sighup_reloads_the_configured_uri(reloading_server, models):
    relabelled(models["original"], models["served"], "run-after-sighup")  # a new model at MODEL_URI
    reloading_server.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while run_id(reloading_server) != "run-after-sighup":
        assert time.monotonic() < deadline, reloading_server.log()[-2000:]
        time.sleep(0.1)
    metrics = httpx.get(f"{reloading_server.url}/metrics").text
    assert 'run_id="run-after-sighup"' in metrics and 'run_id="run-second"' not in metrics  # one info series


@pytest.mark.slow
def test_admin_reload_is_off_without_an_api_key(onnx_model, tmp_path):
    server = Server({"MODEL_URI": str(onnx_model)}, tmp_path / "server.log").start()
    try:
        assert_error(httpx.post(f"{server.url}/v1/admin/reload"), 403, "admin_disabled")
        assert httpx.post(f"{server.url}/v1/predict", files=files(png())).status_code == 200  # no key needed
    finally:
        server.stop()


def test_a_model_that_does_not_load_stops_startup_with_the_reason(tmp_path):
    server = Server({"MODEL_URI": str(tmp_path / "missing.onnx")}, tmp_path / "server.log")
    with pytest.raises(RuntimeError, match="model file not found") as failed:
        server.start(timeout=30)
    log = str(failed.value)
    assert len([line for line in log.splitlines() if "model file not found" in line]) == 1  # no traceback repeats it
    assert "Traceback" not in log


@pytest.mark.slow
def test_sigterm_stops_accepting_and_finishes_requests_in_flight(onnx_model, tmp_path):
    server = Server({"MODEL_URI": str(onnx_model)}, tmp_path / "server.log").start()
    port = int(server.url.rsplit(":", 1)[1])
    head, body = raw_predict_request(png())
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head + body[:100])  # the request has started: its handler is reading the body
        time.sleep(0.3)
        server.signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        connection.sendall(body[100:])
        answer = read_response(connection)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert b'"request_id":"in-flight"' in answer
    assert server.process.wait(20) in CLEAN_EXIT
    events = [e.get("event") for e in server.json_logs()]
    assert "shutdown" in events


def raw_predict_request(blob: bytes) -> tuple[bytes, bytes]:
    """A one-image POST /v1/predict as raw HTTP, head and body apart, for tests that send it in pieces."""
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: in-flight\r\n\r\n"
    ).encode()
    return head, body


def read_response(connection: socket.socket) -> bytes:
    data = b""
    while chunk := connection.recv(65536):
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
            None,
        )
        if length is not None and len(rest) >= length:
            break
    return data
