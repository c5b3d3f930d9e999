"""The monitoring side of the real service: A/B variants with sticky assignment and a shadow, feedback stored as
training data, and the drift report, over HTTP against `uvicorn serve.app:create_app` (the session's A/B server)."""

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from cifarlab.export.onnx import export_onnx
from cifarlab_contract.feedback import FeedbackRecord, open_feedback_store
from cifarlab_contract.model import contract_metadata
from serve import service as service_module
from serve.model import LoadedModel, ModelLoadError
from serve.service import Answer, Service
from serve.settings import Settings
from serve.variants import VariantSpec
from tests.conftest import run_cli
from tests.serve.conftest import API_KEY, Server, Traffic, noise_png, shadow_predictions, wait_until
from tests.training.export.test_onnx import tiny_net


@pytest.fixture
def http(ab_server: Server, ab_traffic: Traffic) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ab_server.url, headers={"X-API-Key": API_KEY}, timeout=30) as client:
        yield client


def predict(http: httpx.Client, client_id: str | None = None, images: int = 1) -> httpx.Response:
    files = [("files", (f"n{i}.png", noise_png(100 + i), "image/png")) for i in range(images)]
    headers = {"X-Client-ID": client_id} if client_id else {}
    response = http.post("/v1/predict", files=files, headers=headers)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.slow
def test_a_client_stays_on_its_variant_and_the_response_names_it(http: httpx.Client) -> None:
    for client in ("alice", "bob", "carol"):
        answers = {
            (r.json()["variant"], r.headers["X-Model-Variant"]) for r in (predict(http, client) for _ in range(4))
        }
        assert len(answers) == 1 and answers.pop()[0] in {"champion", "canary"}
    seen = [predict(http, f"user-{i}").json()["variant"] for i in range(40)]
    assert {"champion", "canary"} == set(seen)  # weights 3:1; the shadow never answers
    assert seen.count("champion") > seen.count("canary")


@pytest.mark.slow
def test_each_variant_reports_its_model_and_share(http: httpx.Client) -> None:
    canary = http.get("/v1/model", params={"variant": "canary"}).json()
    assert (canary["variant"], canary["traffic_share"], canary["shadow"], canary["drift_reference"]) == (
        "canary",
        0.25,
        False,
        True,
    )
    assert http.get("/v1/model").json()["variant"] == "champion"  # the first answering variant
    assert http.get("/v1/model", params={"variant": "challenger"}).json()["shadow"] is True
    missing = http.get("/v1/model", params={"variant": "nope"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_variant"


@pytest.mark.slow
def test_reload_names_its_variant_when_there_are_several(http: httpx.Client) -> None:
    unnamed = http.post("/v1/admin/reload", json={})
    assert unnamed.status_code == 422 and unnamed.json()["error"]["code"] == "variant_required"
    reloaded = http.post("/v1/admin/reload", json={"variant": "canary"})
    assert reloaded.status_code == 200 and reloaded.json()["model"]["variant"] == "canary"


@pytest.mark.slow
def test_feedback_stores_the_image_as_training_data_with_the_shadows_answer(
    http: httpx.Client, ab_traffic: Traffic, ab_server: Server
) -> None:
    shadowed = shadow_predictions(http)
    answer = predict(http, "dave", images=2).json()
    request_id, prediction_id = answer["request_id"], answer["predictions"][1]["prediction_id"]
    wait_until(lambda: shadow_predictions(http) >= shadowed + 2, "the challenger scored the shadow copy")
    body = {"prediction_id": prediction_id, "label": "truck"}
    stored = http.post("/v1/feedback", json=body)
    assert stored.status_code == 201, stored.text
    record = stored.json()
    assert record["created"] and record["label"] == "truck" and record["prediction_id"] == prediction_id
    assert (record["request_id"], record["image_index"]) == (request_id, 1)
    assert record["variant"] == "champion" and set(record["shadows"]) == {"challenger"}
    assert record["correct"] == (record["predicted"] == "truck")

    root = Path(ab_server.env["FEEDBACK_DIR"])
    image = np.asarray(Image.open(root / "truck" / f"{prediction_id}.png"))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    records = open_feedback_store(root).contents().records
    assert {record.prediction_id for record in records} >= {prediction_id, *ab_traffic.feedback}

    again = http.post("/v1/feedback", json=body)
    assert again.status_code == 200 and again.json() == {**record, "created": False}  # idempotent
    conflict = http.post("/v1/feedback", json={**body, "label": "ship"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflicting_feedback"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"prediction_id": "0" * 32, "label": "cat"}, 404, "unknown_prediction"),  # never issued
        ({"prediction_id": "PREDICTION", "label": "unicorn"}, 422, "invalid_feedback"),
        ({"prediction_id": "../escape", "label": "cat"}, 422, "invalid_request"),
        ({"request_id": "PREDICTION", "label": "cat"}, 422, "invalid_request"),  # the field API 1.1 removed
        ({"label": "cat"}, 422, "invalid_request"),
    ],
)
def test_bad_feedback_is_a_4xx_and_stores_nothing(
    http: httpx.Client, ab_traffic: Traffic, ab_server: Server, body: dict, status: int, code: str
) -> None:
    root = Path(ab_server.env["FEEDBACK_DIR"])
    before = sorted(root.rglob("*"))
    body = {key: ab_traffic.prediction_ids[-1] if value == "PREDICTION" else value for key, value in body.items()}
    response = http.post("/v1/feedback", json=body)
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text
    assert sorted(root.rglob("*")) == before
    malformed = http.post("/v1/feedback", content=b"{oops", headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["code"] == "invalid_json"


@pytest.mark.slow
def test_drift_report_flags_the_noise_traffic_per_variant(http: httpx.Client) -> None:
    report = http.get("/v1/drift").json()["variants"]
    assert set(report) == {"champion", "canary", "challenger"}
    champion = report["champion"]
    assert champion["status"] == "drift" and champion["drift_detected"] and champion["in_window"] == 20
    assert set(champion["tests"]) == {
        "confidence",
        "mean_r",
        "mean_g",
        "mean_b",
        "brightness",
        "contrast",
        "sharpness",
        "class_mix",
    }
    assert champion["tests"]["sharpness"]["drifted"] and champion["tests"]["sharpness"]["p_value"] < 1e-4
    assert champion["reference"]["images"] > 0


@pytest.mark.slow
def test_feedback_and_drift_show_up_as_metrics(http: httpx.Client, ab_traffic: Traffic) -> None:
    metrics = http.get("/metrics").text
    assert 'cifarlab_drift_detected{variant="champion"} 1.0' in metrics
    assert 'cifarlab_live_accuracy{variant="challenger"' in metrics  # the shadow is scored on the same feedback
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("cifarlab_feedback_total{") and 'variant="challenger"' in line
    )
    assert counted >= len(ab_traffic.feedback)
    assert 'cifarlab_http_requests_total{method="POST",route="/v1/predict",status="200",variant="canary"}' in metrics


def test_variants_that_predict_different_classes_do_not_start(tiny_model: Path, tmp_path: Path) -> None:
    classes = [f"other{i}" for i in range(10)]
    other = export_onnx(tiny_net(), tmp_path / "other.onnx", contract_metadata(classes, "run-8", "ab" * 32))
    variants = {"champion": VariantSpec(model_uri=str(tiny_model)), "challenger": VariantSpec(model_uri=str(other))}
    service = Service(Settings(variants=variants))
    with pytest.raises(ModelLoadError, match=r"predicts \['other0'.*the other variants \['airplane'"):
        asyncio.run(service.start())


@pytest.mark.slow
def test_ab_report_reads_the_servers_feedback_and_metrics(
    http: httpx.Client, ab_server: Server, ab_traffic: Traffic, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    result = run_cli(
        "scripts/ab_report.py",
        *("--feedback", ab_server.env["FEEDBACK_DIR"], "--metrics-url", f"{ab_server.url}/metrics"),
        *("--json", str(out)),
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["comparison"]["design"] == "paired"  # the challenger shadowed every request
    rows = {row["variant"]: row for row in report["variants"]}
    # other tests of this server add feedback too: count what the store holds when the report was made
    records = open_feedback_store(ab_server.env["FEEDBACK_DIR"]).contents().records
    assert len(records) == report["records"] >= len(ab_traffic.feedback)
    answered = Counter(record.variant for record in records)
    assert answered["canary"] >= 1  # client-3 of the traffic lands on the canary
    for name in ("champion", "canary"):
        assert rows[name]["role"] == "answer" and rows[name]["feedback"] == answered[name] > 0
        assert rows[name]["predictions"] > 0
    assert rows["challenger"]["role"] == "shadow"
    assert rows["challenger"]["feedback"] == len(records)  # it shadowed every request, so it is scored on all
    assert report["recommendation"]["action"] == "collect"  # a handful of labels decides nothing


def test_a_shadow_that_falls_behind_loses_copies_not_answers(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "SHADOW_BACKLOG", -1)  # any backlog is too much: every copy is dropped
    variants = {
        "champion": VariantSpec(model_uri=str(tiny_model)),
        "challenger": VariantSpec(model_uri=str(tiny_model), shadow=True),
    }
    service = Service(Settings(variants=variants, feedback_dir=tmp_path / "feedback"))
    images = np.zeros((3, 32, 32, 3), dtype=np.uint8)

    async def serve_two_requests() -> list[Answer]:
        await service.start()
        try:
            return [await service.predict(images, "champion", f"r{i}") for i in range(2)]
        finally:
            await service.stop()

    answers = asyncio.run(serve_two_requests())
    assert [a.variant for a in answers] == ["champion", "champion"] and answers[0].probabilities.shape == (3, 10)
    dropped = service.metrics.registry.get_sample_value("cifarlab_shadow_dropped_total", {"variant": "challenger"})
    assert dropped == 2
    assert service.recent is not None and service.recent.get(answers[1].prediction_ids[2]).shadows == {}


def test_feedback_sent_before_the_shadow_has_answered_waits_for_it_and_scores_it(
    tiny_model: Path, tmp_path: Path
) -> None:
    variants = {
        "champion": VariantSpec(model_uri=str(tiny_model)),
        "challenger": VariantSpec(model_uri=str(tiny_model), shadow=True),
    }
    service = Service(Settings(variants=variants, feedback_dir=tmp_path / "feedback"))

    async def feedback_right_after_the_answer() -> tuple[float, FeedbackRecord]:
        await service.start()
        shadow = service.variants["challenger"]
        infer = shadow.batcher._infer

        def slow_infer(images: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
            time.sleep(0.5)  # the shadow is busy: the client's feedback arrives first
            return infer(images)

        shadow.batcher._infer = slow_infer
        try:
            answer = await service.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8), "champion", "early")
            started = time.perf_counter()
            record, created = await service.submit_feedback(answer.prediction_ids[0], "cat")
            assert created
            return time.perf_counter() - started, record
        finally:
            await service.stop()

    waited, record = asyncio.run(feedback_right_after_the_answer())
    assert set(record.shadows) == {"challenger"}
    assert 0.3 < waited < service_module.SHADOW_FEEDBACK_WAIT_S
