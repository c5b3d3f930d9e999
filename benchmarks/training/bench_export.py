"""The ONNX export at fit end, with and without `preload_exporter`, each in a fresh process as `make train` meets it.

`preload_exporter` imports the exporter and builds its operator registry on a background thread while training
runs; the export at fit end then only traces and converts. Without it, the export does all three. The network is
the default recipe's (configs/model/airbench.yaml), freshly initialised: the export's cost does not depend on the
weights. The two variants take turns, one fresh process each time, so that a change in the machine's load hits
both. Prints a table of medians and writes JSON.

    python -m benchmarks.training.bench_export                    # 5 processes per variant
    python -m benchmarks.training.bench_export --runs 9 --output build/bench-export.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from cifarlab_contract.files import write_atomic

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {"without preload": False, "preloaded (imports and registry)": True}

# One measurement: the time of export_onnx alone, after the preload has finished (as the first epoch hides it).
CHILD = """
import json, sys, time
from hydra.utils import instantiate
from omegaconf import OmegaConf
from cifarlab.export.onnx import export_onnx, preload_exporter
from cifarlab.models.module import ClassifierNet
model = OmegaConf.load(sys.argv[1])
net = ClassifierNet(instantiate(model.net), flip_tta=model.flip_tta, translate_tta=model.translate_tta).eval()
registry = preload_exporter().result() if sys.argv[2] == "1" else None
start = time.perf_counter()
export_onnx(net, sys.argv[3], {}, registry)
print(json.dumps(time.perf_counter() - start))
"""


def export_seconds(preload: bool, folder: Path) -> float:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT / "configs/model/airbench.yaml"), str(int(preload)), "model.onnx"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per variant")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/training/results/export.json")
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.runs):
            for name, preload in VARIANTS.items():
                seconds[name].append(export_seconds(preload, Path(folder)))
    medians = {name: statistics.median(times) for name, times in seconds.items()}
    baseline = medians["without preload"]
    print(f"ONNX export of the default network, {args.runs} fresh processes each, load {os.getloadavg()[0]:.2f}")
    print(f"{'variant':<34} {'median s':>9} {'min s':>7} {'max s':>7} {'vs without':>11}")
    for name, times in seconds.items():
        ratio = medians[name] / baseline
        print(f"{name:<34} {medians[name]:>9.2f} {min(times):>7.2f} {max(times):>7.2f} {ratio:>10.2f}x")
    report = {"runs": args.runs, "load_average_end": os.getloadavg()[0], "seconds": seconds, "median_s": medians}
    write_atomic(args.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
