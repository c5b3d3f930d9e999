"""A real uvicorn server on loopback serving the session's tiny model, real test images from the sample, and the
service serving three variants (A/B split and a shadow) with the traffic the monitoring tests look at."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, SAMPLE

API_KEY = "test-key-0123456789"
# uvicorn finishes its graceful shutdown, then re-raises SIGTERM so that the process ends by that signal
CLEAN_EXIT = (0, -signal.SIGTERM)


@dataclass
class Server:
    """A `uvicorn serve.app:create_app --factory` subprocess on a free loopback port."""

    env: dict[str, str]
    log_path: Path
    python: str = sys.executable
    cwd: Path = ROOT
    process: subprocess.Popen | None = None
    url: str = ""
    _log: io.BufferedWriter | None = field(default=None, repr=False)

    def start(self, timeout: float = 60.0) -> "Server":
        with socket.socket() as probe:
            # Not `--fd`: uvicorn would listen on a duplicate and the inherited socket would keep accepting
            # connections after shutdown, hiding exactly what the SIGTERM test checks.
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "MODEL_URI")}
        self.process = subprocess.Popen(
            [
                *(self.python, "-m", "uvicorn", "serve.app:create_app", "--factory", "--no-access-log"),
                *("--host", "127.0.0.1", "--port", str(port), "--timeout-graceful-shutdown", "10"),
            ],
            cwd=self.cwd,
            env={**env, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self._log:
            self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def json_logs(self) -> list[dict]:
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def onnx_model(tiny_run: Path) -> Path:
    return tiny_run / "model.onnx"


@pytest.fixture(scope="session")
def test_images() -> list[tuple[str, str, bytes]]:
    """(class, file name, JPEG bytes) of the sample's test images, 4 per class."""
    images: dict[str, list[tuple[str, str, bytes]]] = {}
    with tarfile.open(SAMPLE) as archive:
        for member in archive:
            parts = Path(member.name).parts
            if member.isfile() and parts[1] == "test" and len(images.setdefault(parts[2], [])) < 4:
                handle = archive.extractfile(member)
                assert handle is not None
                images[parts[2]].append((parts[2], parts[3], handle.read()))
    return [image for per_class in images.values() for image in per_class]


def deployed(model: Path) -> dict[str, str]:
    """The environment of the server as deployed: API key on, small limits that tests can cross cheaply."""
    return {
        "MODEL_URI": str(model),
        "API_KEY": API_KEY,
        "MAX_BODY_BYTES": str(256 * 1024),
        "MAX_IMAGES_PER_REQUEST": "8",
        "MAX_IMAGE_PIXELS": str(1024 * 1024),
        "MAX_BATCH_SIZE": "16",
    }


@pytest.fixture(scope="module")
def server(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server as deployed: API key on, small limits so that tests can cross them cheaply."""
    running = Server(deployed(onnx_model), tmp_path_factory.mktemp("server") / "server.log").start()
    yield running
    running.stop()


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        yield http


@dataclass
class Traffic:
    """What the session's A/B server was sent before the monitoring tests look at it."""

    prediction_ids: list[str]  # of each request's one image
    feedback: dict[str, str]  # prediction id -> the true label reported


def noise_png(seed: int) -> bytes:
    """A 32x32 image of uniform noise: nothing like CIFAR-10, so every drift test rejects it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="session")
def ab_server(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real service with three variants of the session's trained model: `champion` answers 3 in 4 clients,
    `canary` 1 in 4, `challenger` shadows every request. Feedback on, drift window of 20 images."""
    folder = tmp_path_factory.mktemp("ab-server")
    variants = {
        "champion": {"model_uri": str(tiny_run / "model.onnx"), "weight": 3},
        "canary": {"model_uri": str(shutil.copy(tiny_run / "model.onnx", folder / "canary.onnx")), "weight": 1},
        "challenger": {"model_uri": str(tiny_run / "model.onnx"), "shadow": True},
    }
    env = {
        "VARIANTS": json.dumps(variants),
        "FEEDBACK_DIR": str(folder / "feedback"),
        "DRIFT_WINDOW": "20",
        "API_KEY": API_KEY,
    }
    server = Server(env, folder / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ab_traffic(ab_server: Server) -> Traffic:
    """Noise images from 30 clients, one bad request, feedback on six answers, one reload of the challenger."""
    prediction_ids, feedback = [], {}
    with httpx.Client(base_url=ab_server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        for i in range(30):
            files = [("files", (f"noise{i}.png", noise_png(i), "image/png"))]
            response = http.post("/v1/predict", files=files, headers={"X-Client-ID": f"client-{i}"})
            response.raise_for_status()
            prediction_ids.append(response.json()["predictions"][0]["prediction_id"])
        assert http.post("/v1/predict", files=[("files", ("x.png", b"not an image", "image/png"))]).status_code == 422
        wait_until(lambda: shadow_predictions(http) >= 30, "the challenger scored every shadow copy")
        for prediction_id, label in zip(prediction_ids[:6], ["cat", "dog", "cat", "ship", "frog", "cat"], strict=True):
            http.post("/v1/feedback", json={"prediction_id": prediction_id, "label": label}).raise_for_status()
            feedback[prediction_id] = label
        http.post("/v1/admin/reload", json={"variant": "challenger"}).raise_for_status()
    return Traffic(prediction_ids, feedback)


def shadow_predictions(http: httpx.Client) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith("cifarlab_predictions_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'variant="challenger"' in line)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.1)
