"""The MLflow comparison of runs as a text table (cifarlab.compare_runs, scripts/compare_runs.py)."""

from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from cifarlab import compare_runs
from cifarlab.mlflow_ui import compare_url

AIRBENCH = "cifarlab.models.airbench.AirbenchNet"
BASELINE = "cifarlab.models.baseline.BaselineCNN"
METRIC_NAMES = ["val/acc_best", "test/acc", "test/f1_macro", "test/loss", "time/train_seconds"]


def make_run(client, experiment_id, name, start, end, params, metrics, sweep):
    run = client.create_run(experiment_id, start_time=start, run_name=name, tags={"sweep.id": sweep})
    run_id = run.info.run_id
    own = {"paths.output_dir": f"/work/runs/{run_id}", "run_id": run_id, "run_name": name}
    for key, value in {**own, "trainer.max_epochs": "2", **params}.items():
        client.log_param(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, timestamp=start, step=0)
    if end is not None:
        client.set_terminated(run_id, end_time=end)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Four runs in a real SQLite store: sweep s1 (two AirbenchNets) and sweep s2 (AirbenchNet vs BaselineCNN)."""
    folder = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("cifar10", artifact_location=(folder / "artifacts").as_uri())
    air = {"model.net._target_": AIRBENCH, "model.label_smoothing": "0.2"}
    base = {"model.net._target_": BASELINE, "model.label_smoothing": "0.0"}
    ids = {
        "a": make_run(
            client, experiment_id, "lr=0.05", 1_000, 91_000, {**air, "optimizer.lr": "0.05"},
            {"val/acc_best": 0.512345, "test/acc": 0.5, "test/f1_macro": 0.49, "test/loss": 1.23456,
             "time/train_seconds": 42.5}, "s1",
        ),
        "b": make_run(
            client, experiment_id, "lr=0.1", 2_000, None, {**air, "optimizer.lr": "0.1"},
            {"val/acc_best": 0.25}, "s1",
        ),
        "c": make_run(
            client, experiment_id, "model=airbench", 3_000, 123_000, {**air, "optimizer.lr": "0.05"},
            {"val/acc_best": 0.6}, "s2",
        ),
        "d": make_run(
            client, experiment_id, "model=baseline", 4_000, 64_000, {**base, "optimizer.lr": "0.05"},
            {"val/acc_best": 0.4}, "s2",
        ),
    }  # fmt: skip
    return SimpleNamespace(uri=uri, client=client, experiment_id=experiment_id, ids=ids)


def sweep_runs(store, sweep):
    return store.client.search_runs(
        [store.experiment_id], f"tags.`sweep.id` = '{sweep}'", order_by=["attributes.start_time ASC"]
    )


def as_dicts(header, rows):
    assert all(len(row) == len(header) for row in rows)
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_only_params_that_differ_are_shown_next_to_the_net_and_metrics(store):
    header, rows = compare_runs.comparison_rows(sweep_runs(store, "s1"))
    assert header == ["run_id", "name", "status", "min", "model.net._target_", "optimizer.lr", *METRIC_NAMES]
    first, second = as_dicts(header, rows)
    assert first == {
        "run_id": store.ids["a"][:12],
        "name": "lr=0.05",
        "status": "FINISHED",
        "min": "1.5",
        "model.net._target_": "AirbenchNet",
        "optimizer.lr": "0.05",
        "val/acc_best": "0.5123",
        "test/acc": "0.5000",
        "test/f1_macro": "0.4900",
        "test/loss": "1.2346",
        "time/train_seconds": "42.5000",
    }
    assert second["status"] == "RUNNING" and second["min"] == "nan"  # not finished: no duration
    assert second["val/acc_best"] == "0.2500"
    assert second["test/acc"] == second["test/f1_macro"] == second["test/loss"] == ""  # missing metrics are blank


def test_params_naming_each_runs_own_id_are_hidden(store):
    header, _ = compare_runs.comparison_rows(sweep_runs(store, "s1"))
    params_shown = header[4 : -len(METRIC_NAMES)]
    assert params_shown == ["model.net._target_", "optimizer.lr"]
    for hidden in ("paths.output_dir", "run_id", "run_name", "trainer.max_epochs"):
        assert hidden not in params_shown


def test_a_varying_net_keeps_its_class_name_and_other_params_their_values(store):
    header, rows = compare_runs.comparison_rows(sweep_runs(store, "s2"))
    assert set(header) == {"run_id", "name", "status", "min", "model.net._target_", "model.label_smoothing"} | set(
        METRIC_NAMES
    )
    by_name = {row["name"]: row for row in as_dicts(header, rows)}
    assert by_name["model=airbench"]["model.net._target_"] == "AirbenchNet"
    assert by_name["model=baseline"]["model.net._target_"] == "BaselineCNN"
    assert by_name["model=airbench"]["model.label_smoothing"] == "0.2"
    assert by_name["model=baseline"]["model.label_smoothing"] == "0.0"
    assert by_name["model=airbench"]["min"] == "2.0" and by_name["model=baseline"]["min"] == "1.0"


def test_long_param_values_are_cut_to_the_column_width(store):
    experiment_id = store.client.create_experiment("long-values")
    long_value = "/very/long/" + "x" * 60
    for start, source in ((1_000, "/short"), (2_000, long_value)):
        make_run(store.client, experiment_id, source[:6], start, start + 60_000, {"data.source": source}, {}, "s")
    runs = store.client.search_runs([experiment_id], order_by=["attributes.start_time ASC"])
    header, rows = compare_runs.comparison_rows(runs)
    assert [row["data.source"] for row in as_dicts(header, rows)] == ["/short", long_value[:40]]
    assert compare_runs.MAX_VALUE_WIDTH == 40


def test_format_table_aligns_columns_under_a_rule():
    header = ["run_id", "model.net._target_", "val/acc_best"]
    rows = [["abc", "AirbenchNet", "0.5123"], ["abcdefgh", "BaselineCNN", ""]]
    assert compare_runs.format_table(header, rows).splitlines() == [
        "run_id    net          val/acc_best",
        "--------  -----------  ------------",
        "abc       AirbenchNet  0.5123      ",
        "abcdefgh  BaselineCNN              ",
    ]


def test_main_prints_the_table_of_one_sweep(store, capsys):
    assert compare_runs.main(["--tracking-uri", store.uri, "--sweep", "s1"]) == 0
    *lines, blank, link = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run_id", "name", "status", "min", "net", "optimizer.lr", *METRIC_NAMES]
    assert set(lines[1]) == {"-", " "}
    assert [line.split()[1] for line in lines[2:]] == ["lr=0.1", "lr=0.05"]  # most recent first
    offset = lines[0].index("status")
    assert [line[offset:].split()[0] for line in lines[2:]] == ["RUNNING", "FINISHED"]  # aligned under its header
    # the same runs in MLflow's compare view (tests/test_browser.py opens such a link in a browser)
    expected = compare_url(store.uri, store.experiment_id, [store.ids["b"], store.ids["a"]])
    assert (blank, link) == ("", f"In the MLflow UI: {expected}")
    assert link.startswith("In the MLflow UI: http://127.0.0.1:5000/#/compare-runs?runs=")


def test_main_last_keeps_the_most_recent_runs(store, capsys):
    assert compare_runs.main(["--tracking-uri", store.uri, "--last", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()[:-2]  # without the link
    assert [line.split()[1] for line in lines[2:]] == ["model=baseline", "model=airbench"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--experiment", "nope"], "error: no experiment 'nope' at {uri}; train a model first"),
        (["--sweep", "s9"], "error: no runs found in 'cifar10' for sweep s9"),
    ],
)
def test_main_without_runs_to_show_is_one_error_line(store, capsys, arguments, message):
    assert compare_runs.main(["--tracking-uri", store.uri, *arguments]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [message.format(uri=store.uri)]
    assert captured.out == ""
