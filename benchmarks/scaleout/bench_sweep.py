"""A sweep sent to SLURM against the same sweep run locally, and what the loopback SLURM cluster costs to start.

    python -m benchmarks.scaleout.bench_sweep            # as root, SLURM installed (make system-deps)

Starts the cluster of tests/scaleout/cluster.py (munged, MariaDB, slurmdbd, slurmctld, two slurmd) `--starts`
times, timing each start until both nodes are idle, and keeps the last one. Then runs the README's two-job sweep
(`python train.py -m model=airbench,baseline debug=limit`, on the committed sample, CSV logs) `--repeats` times
with each launcher, taking turns: `hydra/launcher=basic` runs the jobs one after the other in the sweep's process;
`hydra/launcher=slurm_cpu` submits them as a SLURM array, one job per node, and waits for both. Each figure is the
wall time of the whole `train.py -m` process. Writes `benchmarks/scaleout/results/sweep.{json,md}`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tests.scaleout.cluster import SlurmCluster

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "cifar10-sample.tar.gz"
LAUNCHERS = {"basic": "jobs in turn, in the sweep's process", "slurm_cpu": "a SLURM array, one job per node"}
SWEEP_TIMEOUT_S = 1800


def sweep_seconds(launcher: str, work: Path, jobs: list[str], cluster: SlurmCluster) -> float:
    """Wall time of one `python train.py -m` with this launcher; its outputs go under `work`."""
    command = [
        sys.executable, "train.py", "-m", f"hydra/launcher={launcher}", *jobs, "trainer.accelerator=cpu",
        f"data.source={SAMPLE}", f"data.prepared_root={work.parent / 'prepared'}", "logger=csv",
        f"paths.runs_dir={work / 'runs'}", f"paths.log_dir={work / 'logs'}", f"hydra.sweep.dir={work / 'sweep'}",
    ]  # fmt: skip
    env = {**cluster.env, "PYTHONPATH": str(ROOT), "PROJECT_ROOT": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"the {launcher} sweep failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds


def summary(values: list[float]) -> dict[str, float | list[float]]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def markdown(report: dict) -> str:
    rows = [("cluster start-up (daemons started, both nodes idle)", report["cluster_start_s"])]
    rows += [(f"sweep, hydra/launcher={name} ({LAUNCHERS[name]})", report["sweep_s"][name]) for name in LAUNCHERS]
    ratio = report["sweep_s"]["slurm_cpu"]["median"] / report["sweep_s"]["basic"]["median"]
    return "\n".join(
        [
            f"# A sweep through SLURM vs the same sweep run locally ({report['machine']}, {report['date']})",
            "",
            f"The sweep: `{' '.join(report['sweep'])}` (the committed sample, CSV logs); {report['repeats']} runs of "
            f"each launcher, taking turns. The cluster: {report['nodes']} nodes of {report['node']} on this machine. "
            f"The host's load average: {report['load_average'][0]:.1f} before, {report['load_average'][1]:.1f} after.",
            "",
            "| what | median s | min s | max s |",
            "|---|---|---|---|",
            *(f"| {name} | {v['median']:.1f} | {v['min']:.1f} | {v['max']:.1f} |" for name, v in rows),
            "",
            f"SLURM / basic, medians: {ratio:.2f}x.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="a sweep through SLURM vs the same sweep run locally")
    parser.add_argument("--starts", type=int, default=3, help="cluster start-ups timed")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps per launcher")
    parser.add_argument("--quick", action="store_true", help="one start, one one-job sweep each (debug=fast_dev_run)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scaleout" / "results")
    args = parser.parse_args(argv)
    starts, repeats = (1, 1) if args.quick else (args.starts, args.repeats)
    jobs = ["model=airbench", "debug=fast_dev_run"] if args.quick else ["model=airbench,baseline", "debug=limit"]

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as scratch:
        start_s, cluster = [], None
        for attempt in range(starts):
            if cluster is not None:
                cluster.stop()
            cluster = SlurmCluster(Path(scratch) / f"cluster{attempt}")
            start_s.append(cluster.start())
        assert cluster is not None
        try:
            sweeps: dict[str, list[float]] = {name: [] for name in LAUNCHERS}
            for repeat in range(repeats):
                order = list(LAUNCHERS) if repeat % 2 == 0 else list(reversed(LAUNCHERS))
                for name in order:
                    sweeps[name].append(sweep_seconds(name, Path(scratch) / f"{name}{repeat}", jobs, cluster))
        finally:
            cluster.stop()

    node = cluster.nodes[0]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "load_average": [load_before, os.getloadavg()[0]],  # the host's 1-minute load, before and after: other work
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "sweep": ["python", "train.py", "-m", *jobs],
        "repeats": repeats,
        "nodes": len(cluster.nodes),
        "node": f"{node.cpus} CPU and {node.memory_mb} MB",
        "cluster_start_s": summary(start_s),
        "sweep_s": {name: summary(values) for name, values in sweeps.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / "sweep.md").write_text(table)
    print(table)
    return report


if __name__ == "__main__":
    main()
