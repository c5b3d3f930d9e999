"""eval.py: test-set metrics of a checkpoint or an ONNX export, one code path for both."""

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from cifarlab.data.prepare import load_prepared, source_slug
from cifarlab.errors import ConfigError
from cifarlab.evaluate import evaluate, format_report
from cifarlab.export.onnx import export_onnx, onnx_logits, onnx_session
from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.module import ClassifierNet
from cifarlab.runtime import user_errors_exit
from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.model import contract_metadata
from tests.conftest import CONFIGS, SAMPLE, run_cli

pytestmark = pytest.mark.slow  # trains and evaluates models

OTHER_CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9"]


def eval_cli(tmp_path: Path, prepared_root: Path, *overrides: str):
    return run_cli(
        "eval.py",
        f"data.source={SAMPLE}",
        f"data.prepared_root={prepared_root}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        f"paths.log_dir={tmp_path / 'logs'}",
        *overrides,
        timeout=180,
    )


@pytest.fixture
def compose_eval(prepared_root):
    """configs/eval.yaml as eval.py composes it, for in-process calls of evaluate()."""

    def _compose(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(
                "eval", overrides=[f"data.source={SAMPLE}", f"data.prepared_root={prepared_root}", *overrides]
            )

    yield _compose
    GlobalHydra.instance().clear()


def export_tiny(path: Path, classes) -> Path:
    torch.manual_seed(0)
    net = ClassifierNet(AirbenchNet(widths=(8, 16, 16)))
    return export_onnx(net, path, contract_metadata(classes, "tiny", "00" * 32))


def expected_scores(predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    scores = {"acc": float((predictions == labels).mean())}
    for index, name in enumerate(CIFAR10_CLASSES):
        true_positive = float(((predictions == index) & (labels == index)).sum())
        predicted, actual = float((predictions == index).sum()), float((labels == index).sum())
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual
        scores[f"precision/{name}"] = precision
        scores[f"recall/{name}"] = recall
        scores[f"f1/{name}"] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return scores


def report_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r"class\s+precision\s+recall\s+f1", line))
    return lines[start - 1 : start + 1 + len(CIFAR10_CLASSES)]


def test_checkpoint_and_onnx_export_of_a_run_score_alike(tiny_run, prepared_root, tmp_path):
    run_dir = tiny_run

    models = {"onnx_path": run_dir / "model.onnx", "ckpt_path": run_dir / "checkpoints" / "best.ckpt"}

    reports, outputs = {}, {}
    for key, model in models.items():
        metrics_path = tmp_path / f"{key}.json"
        result = eval_cli(tmp_path / key, prepared_root, f"{key}={model}", f"metrics_path={metrics_path}")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "Traceback" not in result.stderr
        reports[key], outputs[key] = json.loads(metrics_path.read_text()), result.stdout

    per_class = {f"{m}/{c}" for m in ("precision", "recall", "f1") for c in CIFAR10_CLASSES}
    macro = {"precision_macro", "recall_macro", "f1_macro"}
    onnx_report, ckpt_report = reports["onnx_path"], reports["ckpt_path"]
    assert set(onnx_report) == set(ckpt_report) == {"acc", "images", *macro, *per_class}
    assert onnx_report["images"] == ckpt_report["images"] == 1000
    assert onnx_report["acc"] == ckpt_report["acc"]
    for name in per_class | macro:
        assert onnx_report[name] == pytest.approx(ckpt_report[name], abs=1e-6), name

    # the numbers are the test split's, recomputed here from the export's predictions
    test = load_prepared(prepared_root / source_slug(str(SAMPLE))).test
    predictions = onnx_logits(onnx_session(run_dir / "model.onnx"), test.images).argmax(1)
    for name, value in expected_scores(predictions, test.labels).items():
        assert onnx_report[name] == pytest.approx(value, abs=1e-6), name
    assert onnx_report["f1_macro"] == pytest.approx(np.mean([onnx_report[f"f1/{c}"] for c in CIFAR10_CLASSES]))

    for key, stdout in outputs.items():
        lines = report_lines(stdout)
        assert lines[0].startswith(f"accuracy {reports[key]['acc']:.4f}")
        assert [line.split()[0] for line in lines[2:]] == list(CIFAR10_CLASSES)
        cat = next(line for line in lines if line.startswith("cat "))
        assert cat.split()[1:] == [f"{reports[key][f'{m}/cat']:.4f}" for m in ("precision", "recall", "f1")]


def test_eval_cli_with_two_models_is_one_error_line(tmp_path, prepared_root):
    result = eval_cli(tmp_path, prepared_root, "ckpt_path=a.ckpt", "onnx_path=b.onnx")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: give exactly one model to evaluate: ckpt_path=runs/<run id>/checkpoints/best.ckpt "
        "or onnx_path=runs/<run id>/model.onnx"
    ]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "give exactly one model to evaluate"),
        (("ckpt_path=x.ckpt", "onnx_path=y.onnx"), "give exactly one model to evaluate"),
        (("onnx_path=nowhere/model.onnx",), "model file not found: nowhere/model.onnx"),
        (("ckpt_path=nowhere/best.ckpt",), "model file not found: nowhere/best.ckpt"),
    ],
)
def test_wrong_model_arguments_exit_1_with_one_line(compose_eval, capsys, overrides, message):
    with pytest.raises(SystemExit) as caught:
        user_errors_exit(evaluate)(compose_eval(*overrides))
    assert caught.value.code == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"error: {message}")
    assert "Traceback" not in captured.err + captured.out


def test_onnx_export_with_other_classes_is_rejected_naming_both(compose_eval, capsys, tmp_path):
    model = export_tiny(tmp_path / "other.onnx", OTHER_CLASSES)
    metrics_path = tmp_path / "metrics.json"
    with pytest.raises(SystemExit) as caught:
        user_errors_exit(evaluate)(compose_eval(f"onnx_path={model}", f"metrics_path={metrics_path}"))
    assert caught.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"error: {model} was trained on classes {OTHER_CLASSES}, the test data has {list(CIFAR10_CLASSES)}")
    assert not metrics_path.exists()


def test_onnx_metrics_default_beside_the_model(compose_eval, capsys, tmp_path):
    model = export_tiny(tmp_path / "tiny.onnx", CIFAR10_CLASSES)
    summary = evaluate(compose_eval(f"onnx_path={model}"))
    written = json.loads((tmp_path / "tiny.test_metrics.json").read_text())
    assert written == summary and summary["images"] == 1000
    assert format_report(summary, CIFAR10_CLASSES) in capsys.readouterr().out


def test_onnx_file_without_contract_metadata_is_a_config_error(compose_eval, tmp_path):
    model = export_tiny(tmp_path / "tiny.onnx", CIFAR10_CLASSES)
    proto = onnx.load(str(model))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ConfigError, match=r"bare\.onnx has no valid 'classes' metadata"):
        evaluate(compose_eval(f"onnx_path={tmp_path / 'bare.onnx'}"))


def test_format_report_has_a_header_and_one_line_per_class():
    summary = {
        "acc": 0.5,
        "precision_macro": 0.25,
        "recall_macro": 0.75,
        "f1_macro": 0.123456,
        "precision/cat": 1.0,
        "recall/cat": 0.5,
        "f1/cat": 2 / 3,
        "precision/automobile": 0.0,
        "recall/automobile": 0.12345,
        "f1/automobile": 0.0,
    }
    assert format_report(summary, ("cat", "automobile")).splitlines() == [
        "accuracy 0.5000   macro precision 0.2500   macro recall 0.7500   macro F1 0.1235",
        "class        precision    recall        f1",
        "cat             1.0000    0.5000    0.6667",
        "automobile      0.0000    0.1235    0.0000",
    ]
