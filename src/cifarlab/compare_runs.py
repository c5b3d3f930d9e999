"""Print the MLflow comparison of runs as a table: `python scripts/compare_runs.py [--sweep ID] [--last N]`.

The same runs, side by side, as in the MLflow UI's compare view: the parameters that differ between them
and the headline metrics.
"""

import argparse
import os
import sys
from pathlib import Path

from cifarlab.mlflow_ui import compare_url

METRICS = ("val/acc_best", "test/acc", "test/f1_macro", "test/loss", "time/train_seconds")
ALWAYS_SHOWN = ("model.net._target_",)
MAX_VALUE_WIDTH = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = Path(os.environ.get("PROJECT_ROOT", os.getcwd()))  # scripts/compare_runs.py sets it
    default_uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", default_uri))
    parser.add_argument("--experiment", default="cifar10")
    parser.add_argument("--sweep", help="only the runs of this Hydra sweep (the tag sweep.id)")
    parser.add_argument("--last", type=int, default=20, help="the most recent N runs (default 20)")
    return parser.parse_args(argv)


def comparison_rows(runs: list, metrics: tuple[str, ...] = METRICS) -> tuple[list[str], list[list[str]]]:
    """Header and rows: run id, name, status, minutes, the params that vary across runs, the metrics."""
    params = [run.data.params for run in runs]

    def varies(key: str) -> bool:
        # Paths that embed each run's own id differ by construction and say nothing about the recipe.
        own_id = all(run.info.run_id in run.data.params.get(key, "") for run in runs)
        return len({p.get(key) for p in params}) > 1 and not own_id and key != "run_name"

    varying = sorted(k for k in set().union(*params) if varies(k))
    shown = [k for k in ALWAYS_SHOWN if k not in varying] + varying
    header = ["run_id", "name", "status", "min", *shown, *metrics]
    rows = []
    for run in runs:
        info = run.info
        minutes = (info.end_time - info.start_time) / 60_000 if info.end_time else float("nan")
        values = [_shown_value(k, run.data.params.get(k, "")) for k in shown]
        scores = [f"{run.data.metrics[m]:.4f}" if m in run.data.metrics else "" for m in metrics]
        rows.append([info.run_id[:12], info.run_name or "", info.status, f"{minutes:.1f}", *values, *scores])
    return header, rows


def _shown_value(key: str, value: str) -> str:
    if key == "model.net._target_":
        return value.rsplit(".", 1)[-1]  # the network's class name
    return value[:MAX_VALUE_WIDTH]


def format_table(header: list[str], rows: list[list[str]]) -> str:
    short = ["net" if h == "model.net._target_" else h for h in header]
    widths = [max(len(str(c)) for c in column) for column in zip(short, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(short, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=args.tracking_uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no experiment {args.experiment!r} at {args.tracking_uri}; train a model first", file=sys.stderr)
        return 1
    query = f"tags.`sweep.id` = '{args.sweep}'" if args.sweep else ""
    runs = client.search_runs(
        [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=args.last
    )
    if not runs:
        print(
            f"error: no runs found in {args.experiment!r}" + (f" for sweep {args.sweep}" if args.sweep else ""),
            file=sys.stderr,
        )
        return 1
    print(format_table(*comparison_rows(runs)))
    run_ids = [run.info.run_id for run in runs]
    print(f"\nIn the MLflow UI: {compare_url(args.tracking_uri, experiment.experiment_id, run_ids)}")
    return 0
