"""Fixtures shared by the monitoring tests: a tiny exported model, and the real service serving three variants."""

import io
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import API_KEY, Server


@dataclass
class Traffic:
    """What the session's A/B server was sent before the monitoring tests look at it."""

    request_ids: list[str]
    feedback: dict[str, str]  # request id -> the true label reported


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
    request_ids, feedback = [], {}
    with httpx.Client(base_url=ab_server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        for i in range(30):
            files = [("files", (f"noise{i}.png", noise_png(i), "image/png"))]
            response = http.post("/v1/predict", files=files, headers={"X-Client-ID": f"client-{i}"})
            response.raise_for_status()
            request_ids.append(response.json()["request_id"])
        assert http.post("/v1/predict", files=[("files", ("x.png", b"not an image", "image/png"))]).status_code == 422
        wait_until(lambda: shadow_predictions(http) >= 30, "the challenger scored every shadow copy")
        for request_id, label in zip(request_ids[:6], ["cat", "dog", "cat", "ship", "frog", "cat"], strict=True):
            http.post("/v1/feedback", json={"request_id": request_id, "label": label}).raise_for_status()
            feedback[request_id] = label
        http.post("/v1/admin/reload", json={"variant": "challenger"}).raise_for_status()
    return Traffic(request_ids, feedback)


def shadow_predictions(http: httpx.Client) -> float:
    lines = [line for line in http.get("/metrics").text.splitlines() if line.startswith("cifarlab_predictions_total")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if 'variant="challenger"' in line)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.1)
