"""A server that follows the registry: `MODEL_URI=models:/<name>@champion` on a real uvicorn server against the real
MLflow server, under steady traffic from two clients (/v1 and /v2), while promotion moves the alias to a new
version, then to one that cannot load, then back. Also the backoff and the alias history's format."""

import io
import json
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from mlflow import MlflowClient
from PIL import Image

from cifarlab_contract.alias_history import AliasMove, alias_history, history_tag
from cifarlab_lifecycle.promotion import promote_version
from serve.follow import MAX_BACKOFF_S, alias_of, backoff
from tests.conftest import CHALLENGER_ALIAS, CHAMPION_ALIAS
from tests.lifecycle import test_promotion
from tests.serve.conftest import Server, wait_until

POLL_S = 1.0
# the promotion tests' models: constant answers ("truck", "airplane"), and one of other classes that cannot load here
always, foreign_onnx, register = test_promotion.always, test_promotion.foreign_onnx, test_promotion.register


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Traffic:
    """Requests one after another from a thread until stopped: every answer's time, status and model version."""

    url: str
    answers: list[tuple[float, int, str]] = field(default_factory=list)  # (monotonic time, status, version)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Traffic":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        image = png()
        v2_body = {"inputs": [{"name": "images", "shape": [1, 32, 32, 3], "datatype": "UINT8", "data": [7] * 3072}]}
        with httpx.Client(base_url=self.url, timeout=30) as http:
            for n in iter(int, 1):
                if self._stop.is_set():
                    return
                try:
                    if n % 2:
                        response = http.post("/v2/models/serve-follow/infer", json=v2_body)
                        version = response.json().get("model_version", "")
                    else:
                        response = http.post("/v1/predict", files=[("files", ("x.png", image, "image/png"))])
                        version = response.json().get("model", {}).get("version", "")
                except httpx.HTTPError as error:
                    self.errors.append(repr(error))
                    continue
                self.answers.append((time.monotonic(), response.status_code, version))
                if response.status_code != 200:
                    self.errors.append(response.text)

    def first_answer_from(self, version: str) -> float | None:
        return next((t for t, status, v in self.answers if v == version and status == 200), None)


def following(server: Server) -> dict:
    response = httpx.get(f"{server.url}/readyz")
    assert response.status_code == 200, response.text  # a failing new version is not unreadiness
    return response.json()["following"]["default"]


@pytest.mark.integration
def test_a_server_follows_the_alias_under_traffic_with_no_failed_request(
    mlflow_server, always, foreign_onnx, tmp_path, capsys
):
    name = "serve-follow"
    client = MlflowClient(mlflow_server)
    first = register(mlflow_server, name, always["truck"])
    client.set_registered_model_alias(name, CHAMPION_ALIAS, first)
    env = {"MODEL_URI": f"models:/{name}@{CHAMPION_ALIAS}", "MODEL_POLL_S": str(POLL_S)}
    server = Server({**env, "MLFLOW_TRACKING_URI": mlflow_server}, tmp_path / "server.log").start()
    traffic = Traffic(server.url).start()
    try:
        wait_until(lambda: len(traffic.answers) >= 10, "the traffic is flowing")
        assert following(server)["served_version"] == first

        second = register(mlflow_server, name, always["airplane"])  # the new challenger
        promoted = time.monotonic()
        promote_version(
            mlflow_server, name, second, {"metric": "test"}, CHAMPION_ALIAS, CHALLENGER_ALIAS, "a better model", "test"
        )
        wait_until(lambda: traffic.first_answer_from(second) is not None, "the new champion answers", timeout=120)
        took = traffic.first_answer_from(second) - promoted
        with capsys.disabled():
            print(f"\npromotion to the new version answering: {took:.2f} s (MODEL_POLL_S={POLL_S})")
        (tmp_path / "follow.json").write_text(json.dumps({"promotion_to_answer_s": took, "poll_s": POLL_S}))
        model = httpx.get(f"{server.url}/v1/model").json()
        assert model["version"] == second
        move = model["alias_history"][-1]
        assert (move["alias"], move["from_version"], move["to_version"]) == (CHAMPION_ALIAS, first, second)
        assert move["why"] == "a better model" and move["via"] == "test" and move["by"] and move["at"]
        state = following(server)
        assert state["last_swap"]["from_version"] == first and state["last_swap"]["to_version"] == second

        broken = register(mlflow_server, name, foreign_onnx)  # other classes: the server refuses to swap it in
        promote_version(mlflow_server, name, broken, {}, CHAMPION_ALIAS, CHALLENGER_ALIAS, "a broken model", "test")
        wait_until(lambda: (following(server)["failing"] or {}).get("version") == broken, "the failure is reported")
        state = following(server)
        assert state["served_version"] == second and state["alias_version"] == broken
        assert "predicts" in state["failing"]["reason"] and state["failing"]["attempts"] >= 1
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'cifarlab_model_follow_failing{variant="default"} 1.0' in metrics
        reloads = [line for line in metrics.splitlines() if line.startswith("cifarlab_model_reloads_total{")]
        assert any('result="failure"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in reloads), reloads
        wait_until(lambda: any(a[2] == second for a in traffic.answers[-3:]), "the old version still answers")

        client.set_registered_model_alias(name, CHALLENGER_ALIAS, second)  # back to the good version
        promote_version(mlflow_server, name, second, {}, CHAMPION_ALIAS, CHALLENGER_ALIAS, "roll back", "test")
        wait_until(lambda: following(server)["failing"] is None, "the failure is cleared")
        assert 'cifarlab_model_follow_failing{variant="default"} 0.0' in httpx.get(f"{server.url}/metrics").text
    finally:
        traffic.stop()
        server.stop()
    assert traffic.errors == []  # no request failed: not during the swap, not while a version failed to load
    versions = [version for _, _, version in traffic.answers]
    assert set(versions) == {first, second} and versions.index(second) > versions.index(first)
    assert broken not in versions
    failed = [line for line in server.json_logs() if line.get("event") == "follow" and line["level"] == "error"]
    assert failed and failed[0]["version"] == broken and "keeps serving" in failed[0]["message"]


def test_backoff_doubles_from_the_poll_interval_to_a_ceiling():
    assert [backoff(30, attempts) for attempts in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert backoff(30, 50) == MAX_BACKOFF_S


def test_only_alias_uris_are_followed():
    assert alias_of("models:/cifar10-classifier@champion") == ("cifar10-classifier", "champion")
    assert alias_of("models:/cifar10-classifier/3") is None
    assert alias_of("runs:/abc/model") is None and alias_of("runs/x/model.onnx") is None


def test_alias_history_tags_sort_in_time_and_skip_what_does_not_parse():
    moves = [
        AliasMove("champion", str(v), str(v + 1), "ana", f"2026-12-03T10:0{v}:00.000001+00:00", "", "x") for v in (2, 1)
    ]
    tags = dict(history_tag(move) for move in moves)
    assert all(key.startswith("alias_history.champion.20261203T10") for key in tags)
    tags["alias_history.champion.zzz"] = "not json"
    tags[history_tag(AliasMove("challenger", "1", "2", "b", "2026-12-03T09:00:00+00:00", "", "x"))[0]] = "{}"
    assert alias_history(tags, "champion") == moves[::-1]
