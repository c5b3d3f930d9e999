"""Training speed: the template's own path against a minimal raw PyTorch loop, on the same device, in one run.

Both train the same composed recipe (network, optimizer, schedule, data tensors, augmentation, precision) from
the same seed. The template runs `cifarlab.train.train` (Hydra config -> Lightning Trainer), once without
logger and callbacks and once with MLflow tracking and checkpoints; the raw loop is the few lines of PyTorch
below. Reported: wall time of the training phase (device synchronised), the median epoch time, test accuracy,
and the template/raw ratios. `--reference-airbench` also trains the `airbench` package (PyPI 0.1.8, GPU only) on
the same prepared CIFAR-10 copy. Writes JSON and prints a table.

    python scripts/bench_speed.py --quick                       # minutes on 2 CPU cores; last line: the ratio
    CIFAR10_SOURCE=/path/cifar10-jpg.tar.gz python scripts/bench_speed.py --experiment cpu_airbench
    python scripts/bench_speed.py --experiment speedrun --device cuda --seeds 10 --reference-airbench \\
        data.source=/path/cifar10-jpg.tar.gz                   # on a GPU machine (see docs/training.md, Speed)
"""

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402

from cifarlab.callbacks.timing import synchronize  # noqa: E402
from cifarlab.errors import ConfigError  # noqa: E402
from cifarlab.runtime import check_accelerator, user_errors_exit  # noqa: E402
from cifarlab.train import train  # noqa: E402
from cifarlab_contract.files import write_atomic  # noqa: E402

SAMPLE = ROOT / "data" / "cifar10-sample.tar.gz"
QUICK = {"experiment": "cpu_airbench", "epochs": 1, "repeats": 3}  # 7 steps of 512 per epoch on the sample
ACCELERATORS = {"cpu": "cpu", "cuda": "gpu", "mps": "mps"}  # --device -> trainer.accelerator


def compose_recipe(experiment: str, device: str, epochs: int | None, overrides: Sequence[str]) -> DictConfig:
    """The recipe as `python train.py experiment=<experiment> <overrides>` would compose it, on `device`."""
    extra = [f"trainer.max_epochs={epochs}"] if epochs else []
    if device == "cpu":
        extra.append("trainer.precision=32-true")  # bf16 autocast on a CPU is slower, not faster
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                f"trainer.accelerator={ACCELERATORS[device]}",
                "trainer.num_sanity_val_steps=0",
                "++trainer.enable_progress_bar=false",
                "++trainer.enable_model_summary=false",
                *extra,
                *overrides,
            ],
        )
    GlobalHydra.instance().clear()
    return cfg


def _timed_template_config(cfg: DictConfig, workdir: Path, tracked: bool) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.paths.runs_dir = str(workdir / "runs")
        cfg.paths.log_dir = str(workdir / "logs")
        if tracked:
            cfg.logger.tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
            # Export once at fit end, outside the timed phase (every_best would export inside it).
            cfg.callbacks.onnx_export.every_best = False
        else:
            cfg.logger = None
            cfg.callbacks = {}
        cfg.callbacks.clock = {
            "_target_": "cifarlab.callbacks.timing.TrainingClock",
            "path": "${paths.output_dir}/timing.json",
        }
    return cfg


def run_template(cfg: DictConfig, workdir: Path, tracked: bool = False) -> dict:
    """Train through `cifarlab.train.train`; the clock callback times the training phase."""
    cfg = _timed_template_config(cfg, workdir, tracked)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    timing = json.loads((run_dir / "timing.json").read_text())
    test = json.loads((run_dir / "test_metrics.json").read_text())
    return {**timing, "test_acc": test["acc"]}


def run_raw(cfg: DictConfig, device: torch.device) -> dict:
    """The same recipe in plain PyTorch: same modules, optimizer, schedule, tensors and augmentation."""
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    datamodule.splits = {name: (x.to(device), y.to(device)) for name, (x, y) in datamodule.splits.items()}
    model = instantiate(cfg.model, optimizer=cfg.optimizer, scheduler=cfg.get("scheduler"), _recursive_=False)
    net = model.net.to(device)
    loader = datamodule.train_dataloader()
    epochs = cfg.trainer.max_epochs
    optimizer = instantiate(cfg.optimizer, _partial_=True)(model.param_groups())
    scheduler = instantiate(cfg.scheduler, _partial_=True)(optimizer, total_steps=epochs * len(loader))
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.trainer.precision == "bf16-mixed")
    smoothing, validate_every = cfg.model.label_smoothing, cfg.trainer.check_val_every_n_epoch

    synchronize(device)
    start = time.perf_counter()
    net.backbone.fit_whitening(net.preprocess(datamodule.train_images[:5000]))
    epoch_seconds = []
    for epoch in range(epochs):
        epoch_start = time.perf_counter()
        loader.sampler.set_epoch(epoch)
        net.train()
        for images, labels in loader:
            with autocast:
                loss = F.cross_entropy(net(images), labels, label_smoothing=smoothing)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if (epoch + 1) % validate_every == 0:  # the template validates at the same epochs
            accuracy(net, datamodule.val_dataloader(), autocast)
        synchronize(device)
        epoch_seconds.append(time.perf_counter() - epoch_start)
    train_seconds = time.perf_counter() - start
    return {
        "train_seconds": train_seconds,
        "epoch_seconds": epoch_seconds,
        "steps_per_epoch": len(loader),
        "test_acc": accuracy(net, datamodule.test_dataloader(), autocast),
    }


@torch.no_grad()
def accuracy(net: torch.nn.Module, loader: Iterator, autocast: contextlib.AbstractContextManager) -> float:
    net.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast:
            correct += (net(images).argmax(1) == labels).sum()
        total += len(labels)
    return float(correct) / total


def run_airbench(cfg: DictConfig, workdir: Path, seed: int) -> dict:
    """airbench94 (PyPI airbench==0.1.8: SGD + lookahead, batch 1024) on the same prepared CIFAR-10 copy."""
    import airbench  # GPU machines only: it needs CUDA and torchvision

    folder = workdir / "cifar10"
    if not (folder / "test.pt").is_file():
        dataset = instantiate(cfg.data).load()
        folder.mkdir(parents=True, exist_ok=True)
        for name, split in (("train", dataset.train), ("test", dataset.test)):
            images, labels = torch.from_numpy(split.images), torch.from_numpy(split.labels)
            torch.save({"images": images, "labels": labels, "classes": list(cfg.data.classes)}, folder / f"{name}.pt")
    previous = Path.cwd()
    os.chdir(workdir)  # train94 opens its test set at ./cifar10
    try:
        aug = {"flip": True, "translate": 2}
        train_loader = airbench.CifarLoader(str(folder), train=True, batch_size=1024, aug=aug, altflip=True)
        test_loader = airbench.CifarLoader(str(folder), train=False, batch_size=2000)
        torch.manual_seed(seed)
        synchronize(torch.device("cuda"))
        start = time.perf_counter()
        model = airbench.train94(train_loader, verbose=False)
        synchronize(torch.device("cuda"))
        seconds = time.perf_counter() - start
        return {"train_seconds": seconds, "epoch_seconds": [], "test_acc": airbench.evaluate(model, test_loader, 2)}
    finally:
        os.chdir(previous)


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile: the Cornish–Fisher expansion around the normal one (within 1% for df >= 4)."""
    z = 1.959964
    terms = ((z**3 + z) / 4, (5 * z**5 + 16 * z**3 + 3 * z) / 96, (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384)
    return z + sum(term / df**power for power, term in enumerate(terms, start=1))


def summarize(runs: list[dict]) -> dict:
    times = [run["train_seconds"] for run in runs]
    epochs = [s for run in runs for s in (run["epoch_seconds"][1:] or run["epoch_seconds"])]  # no warm-up epoch
    accs = [run["test_acc"] for run in runs]
    summary = {
        "runs": len(runs),
        "train_seconds_median": statistics.median(times),
        "epoch_seconds_median": statistics.median(epochs) if epochs else None,
        "test_acc_mean": statistics.fmean(accs),
        "test_acc_ci95": None,
    }
    if len(accs) > 1:
        summary["test_acc_ci95"] = t_quantile_975(len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs))
    return summary


def benchmark(
    cfg: DictConfig,
    device: torch.device,
    repeats: int,
    workdir: Path,
    tracked: bool = True,
    reference_airbench: bool = False,
    warmup: bool = False,
) -> dict:
    """Interleave raw and template runs (seeds seed, seed+1, ...) so load on the machine hits both alike."""
    variants: dict[str, Callable[[DictConfig, Path], dict]] = {
        "raw": lambda c, w: run_raw(c, device),
        "template": lambda c, w: run_template(c, w),
    }
    if tracked:
        variants["template+mlflow"] = lambda c, w: run_template(c, w, tracked=True)
    if reference_airbench:
        variants["airbench 0.1.8"] = lambda c, w: run_airbench(c, workdir, c.seed)
    if warmup:  # compile caches, cuDNN autotuning and GPU clocks, paid once outside the measurement
        for name, run in variants.items():
            print(f"warm-up: {name}", file=sys.stderr, flush=True)
            run(cfg, workdir / "warmup")
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for repeat in range(repeats):
        seeded = cfg.copy()
        with open_dict(seeded):
            seeded.seed = cfg.seed + repeat
        for name, run in variants.items():
            if name == "template+mlflow" and repeat > 0:
                continue  # one tracked run shows the logger's cost; the ratio uses the bare ones
            result = run(seeded, workdir / f"{name.split()[0]}-{repeat}")
            results[name].append(result)
            print(
                f"{name} seed {seeded.seed}: {result['train_seconds']:.2f} s, test acc {100 * result['test_acc']:.2f}%",
                file=sys.stderr,
                flush=True,
            )
    return {name: {"summary": summarize(runs), "runs": runs} for name, runs in results.items()}


def report(results: dict, meta: dict) -> str:
    raw = results["raw"]["summary"]
    header = f"{'variant':<16} {'runs':>4} {'train s (median)':>17} {'epoch s (median)':>17} {'test acc':>16}"
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        s = result["summary"]
        epoch = f"{s['epoch_seconds_median']:.3f}" if s["epoch_seconds_median"] is not None else "-"
        acc = f"{100 * s['test_acc_mean']:.2f}%"
        if s["test_acc_ci95"] is not None:
            acc += f" ±{100 * s['test_acc_ci95']:.2f}"
        lines.append(f"{name:<16} {s['runs']:>4} {s['train_seconds_median']:>17.3f} {epoch:>17} {acc:>16}")
    template = results["template"]["summary"]
    lines.append("")
    lines.append(f"{meta['experiment']} on {meta['device_name']}, {meta['epochs']} epochs x {meta['steps']} steps")
    lines.append(accuracy_agreement(template, raw))
    if template["epoch_seconds_median"] and raw["epoch_seconds_median"]:
        per_epoch = template["epoch_seconds_median"] / raw["epoch_seconds_median"]
        lines.append(f"template/raw per-epoch time ratio: {per_epoch:.3f}")
    lines.append(f"template/raw training time ratio: {meta['ratio']:.3f}")
    return "\n".join(lines)


def accuracy_agreement(template: dict, raw: dict) -> str:
    """The template's mean test accuracy against the raw loop's. Both train the same function on the same
    batches, so a gap wider than their two 95% intervals together means one path differs (a layer left
    unfitted, a setting not applied), not noise."""
    gap = 100 * (template["test_acc_mean"] - raw["test_acc_mean"])
    line = f"template - raw test accuracy: {gap:+.2f} points"
    intervals = (template["test_acc_ci95"], raw["test_acc_ci95"])
    if None not in intervals and abs(gap) > 100 * sum(intervals):
        line += " (WARNING: outside both 95% intervals: the two paths do not train the same function)"
    return line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="cpu_airbench, 3 x 1 epoch on the committed sample")
    parser.add_argument("--experiment", default="cpu_airbench", help="configs/experiment/<name>.yaml")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--seeds", type=int, default=1, help="repeats, with seeds seed, seed+1, ...")
    parser.add_argument("--no-tracked", action="store_true", help="skip the run with MLflow and checkpoints")
    parser.add_argument("--reference-airbench", action="store_true", help="also run airbench==0.1.8 (GPU)")
    parser.add_argument("--warmup", action="store_true", help="one untimed run of each variant first")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_speed.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.source=... model.compile=true")
    args = parser.parse_args(argv)
    if args.quick:
        args.experiment, args.epochs, args.seeds = QUICK["experiment"], QUICK["epochs"], QUICK["repeats"]
        args.overrides = [f"data.source={SAMPLE}", *args.overrides]
    return args


@user_errors_exit
def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    check_accelerator(ACCELERATORS[args.device])
    if args.reference_airbench and args.device != "cuda":
        raise ConfigError("--reference-airbench needs --device cuda (the airbench package is written for CUDA)")
    torch.backends.cudnn.benchmark = True
    cfg = compose_recipe(args.experiment, args.device, args.epochs, args.overrides)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_speed.") as workdir:
        results = benchmark(
            cfg,
            device,
            args.seeds,
            Path(workdir),
            tracked=not args.no_tracked,
            reference_airbench=args.reference_airbench,
            warmup=args.warmup,
        )
    ratio = results["template"]["summary"]["train_seconds_median"] / results["raw"]["summary"]["train_seconds_median"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    meta = {
        "experiment": args.experiment,
        "overrides": list(args.overrides),
        "device_name": device_name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "epochs": cfg.trainer.max_epochs,
        "steps": results["raw"]["runs"][0]["steps_per_epoch"],
        "ratio": ratio,
        "config": OmegaConf.to_container(cfg, resolve=False),
    }
    document = {"meta": meta, "results": results}
    write_atomic(args.out, json.dumps(document, indent=2))
    print(report(results, meta))
    print(f"JSON: {args.out}", file=sys.stderr)
    print(f"{ratio:.3f}")
    return document
