"""serve.settings: one model (MODEL_URI) or several variants (VARIANTS, JSON), read from the environment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.settings import Settings, load_settings
from serve.variants import VariantSpec
from tests.conftest import ROOT


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL_URI", "VARIANTS", "VARIANT", "FEEDBACK_DIR"):
        monkeypatch.delenv(name, raising=False)


def test_model_uri_alone_is_one_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_URI", "runs/x/model.onnx")
    assert Settings().variant_specs() == {"default": VariantSpec(model_uri="runs/x/model.onnx")}
    monkeypatch.setenv("VARIANT", "blue")
    assert list(Settings().variant_specs()) == ["blue"]


def test_variants_come_from_json_and_replace_model_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_URI", "/models/model.onnx")  # the image's default
    variants = {"champion": {"model_uri": "a.onnx", "weight": 9}, "challenger": {"model_uri": "b.onnx", "shadow": True}}
    monkeypatch.setenv("VARIANTS", json.dumps(variants))
    assert Settings().variant_specs() == {
        "champion": VariantSpec(model_uri="a.onnx", weight=9),
        "challenger": VariantSpec(model_uri="b.onnx", shadow=True),
    }


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({}, r"settings: Value error, set MODEL_URI \(one model\) or VARIANTS"),
        ({"VARIANTS": '{"bad name": {"model_uri": "a.onnx"}}'}, "variant names must be"),
        ({"VARIANTS": '{"a": {"weight": 2}}'}, "variants.a.model_uri: Field required"),
        ({"VARIANTS": '{"a": {"model_uri": "a.onnx", "shadow": true}}'}, "at least one variant must answer"),
        ({"VARIANTS": "champion=90"}, r"\"variants\" .*: Expecting value"),
        ({"MODEL_URI": "m.onnx", "DRIFT_WINDOW": "5"}, "drift_window: Input should be greater than or equal to 20"),
        ({"MODEL_URI": "m.onnx", "DRIFT_WINDOW": "20001"}, "drift_window: Input should be less than or equal to 20000"),
    ],
)
def test_bad_settings_are_one_line_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], message: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit, match=f"^error: invalid server settings: .*{message}") as exit_info:
        load_settings()
    assert "\n" not in str(exit_info.value)


def test_the_server_process_stops_on_bad_settings_with_that_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_URI", "VARIANTS")} | {"VARIANTS": "champion=90"}
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "serve.app:create_app", "--factory", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: invalid server settings: error parsing value")
