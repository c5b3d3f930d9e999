"""The training speed benchmark (benchmarks/training/bench_speed.py, scripts/bench_speed.py): the template and the
raw loop train the same recipe, timed, side by side."""

import json

import pytest

from benchmarks.training import bench_speed
from tests.conftest import SAMPLE

pytestmark = pytest.mark.slow  # a training benchmark


def test_one_epoch_benchmark_reports_both_paths_and_their_ratio(tmp_path, prepared_root, capsys):
    out = tmp_path / "bench.json"
    document = bench_speed.main(
        [
            "--epochs=1",
            "--no-tracked",  # the tracked path is train()'s default, tested in tests/training/test_train.py
            f"--out={out}",
            f"data.source={SAMPLE}",
            f"data.prepared_root={prepared_root}",
            "model.net.widths=[8,16,16]",
            "data.batch_size=600",  # 3,600 training images: 6 steps
        ]
    )
    assert json.loads(out.read_text()) == document
    results, meta = document["results"], document["meta"]
    assert set(results) == {"raw", "template"}
    assert meta["experiment"] == "cpu_airbench" and meta["epochs"] == 1 and meta["steps"] == 6
    for name, result in results.items():
        (run,) = result["runs"]
        assert len(run["epoch_seconds"]) == 1, name
        assert 0 < run["epoch_seconds"][0] <= run["train_seconds"], name
        assert 0.0 < run["test_acc"] <= 1.0, name
        assert result["summary"]["train_seconds_median"] == run["train_seconds"]
    ratio = results["template"]["summary"]["train_seconds_median"] / results["raw"]["summary"]["train_seconds_median"]
    assert meta["ratio"] == pytest.approx(ratio)

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == f"{ratio:.3f}"  # the last line is the ratio alone
    assert any(line.startswith("template ") for line in printed) and any(line.startswith("raw ") for line in printed)
    assert any(line.startswith("template - raw test accuracy: ") for line in printed)


def test_recipe_is_composed_for_the_requested_device(prepared_root):
    cfg = bench_speed.compose_recipe("speedrun", "cpu", 1, [f"data.source={SAMPLE}"])
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"  # bf16 only on GPUs
    assert cfg.trainer.max_epochs == 1 and cfg.trainer.num_sanity_val_steps == 0
    assert cfg.optimizer._target_ == "cifarlab.models.optim.Muon"


def test_summary_medians_and_student_t_interval():
    assert bench_speed.t_quantile_975(4) == pytest.approx(2.776, rel=0.01)
    assert bench_speed.t_quantile_975(9) == pytest.approx(2.262, rel=0.002)
    assert bench_speed.t_quantile_975(29) == pytest.approx(2.045, rel=0.001)
    accs = [0.93, 0.94, 0.95, 0.94, 0.94]
    runs = [{"train_seconds": 1.0 + i, "epoch_seconds": [9.0, 1.0 + i], "test_acc": a} for i, a in enumerate(accs)]
    summary = bench_speed.summarize(runs)
    assert summary["train_seconds_median"] == 3.0
    assert summary["epoch_seconds_median"] == 3.0  # each run's first (warm-up) epoch left out
    assert summary["test_acc_mean"] == pytest.approx(0.94)
    # by hand: sample stdev 0.00707, t(4) 2.776, sqrt(5) 2.236
    assert summary["test_acc_ci95"] == pytest.approx(2.776 * 0.0070711 / 5**0.5, rel=0.01)


def test_report_warns_when_template_and_raw_accuracies_disagree():
    def summary(mean: float, ci: float | None) -> dict:
        return {"test_acc_mean": mean, "test_acc_ci95": ci}

    # the H200 figures of a template that skipped its whitening fit (docs/results.md): 90.20 +-0.11 vs 90.59 +-0.10
    line = bench_speed.accuracy_agreement(summary(0.9020, 0.0011), summary(0.9059, 0.0010))
    assert line.startswith("template - raw test accuracy: -0.39 points") and "WARNING" in line
    assert "WARNING" not in bench_speed.accuracy_agreement(summary(0.9055, 0.0011), summary(0.9059, 0.0010))
    assert "WARNING" not in bench_speed.accuracy_agreement(summary(0.80, None), summary(0.90, None))  # one seed
