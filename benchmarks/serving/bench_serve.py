"""Serving benchmark: the ONNX Runtime service (serve/) against a FastAPI + PyTorch-eager baseline and a bare
ASGI floor (floor_server.py), same run, same machine, same load generator. Writes JSON and a Markdown table.

    python -m benchmarks.serving.bench_serve            # make bench-serve
    python -m benchmarks.serving.bench_serve --models airbench --duration 3 --repeats 1 --load-requests 2000
    python -m benchmarks.serving.bench_serve --base-revision 729f5ad --no-settings --load-requests 0 \
        --out build/bench-vs-729f5ad                    # today's serve/ beside an older commit's, taking turns

Measures, per network (airbench, resnet18; untrained weights, which do not change speed, and a drift reference):
raw ONNX Runtime at batch 1 and 64 (and its CPU time per image) and PyTorch eager at batch 1 and 64; p50/p99
latency, throughput and the CPU time per request of server and load generator through HTTP at each concurrency for
each server (with --base-revision, another commit's serve/ too); ONNX Runtime spin-waiting on vs off; and a long
load run with the server's resident memory sampled every 1,000 requests. Every measurement but the load run is
repeated (--repeats) and reported as its median: on a shared machine one pass can be a third slower than the next.
"""

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.serving.loadgen import multipart_request, run_load, v2_binary_request
from benchmarks.serving.nets import build
from cifarlab.export.onnx import export_onnx
from cifarlab.export.reference import embed_reference
from cifarlab_contract.classes import CIFAR10_CLASSES
from cifarlab_contract.model import contract_metadata
from serve.model import load_model
from serve.preprocess import decode_image
from serve.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "data" / "cifar10-sample.tar.gz"
HOST = "127.0.0.1"
BASELINE = "torch baseline"
OURS, FLOOR, BENTOML, TRITON = "onnx (serve/)", "bare ASGI floor", "BentoML", "Triton (PyTriton)"
BINARY = " v2 binary"  # the suffix of a v2-capable server's rows over uint8 binary tensors instead of JPEGs
MAX_PIXELS = 4096 * 4096  # the service's default max_image_pixels
V2_NAME = "bench"  # the name our server reports its model by (MODEL_NAME)
PEER_VENVS = ROOT / "build" / "peer-venvs"
MEDIAN_KEYS = ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_ms", "client_cpu_ms")
THROUGHPUT_TARGET = 0.85  # of raw ONNX Runtime at batch 64 (the serving issue's target at concurrency >= 16)


def export_like_training(net: torch.nn.Module, path: Path, name: str) -> Path:
    """`net` exported as training exports it: the model contract and a drift reference, so that the service
    computes its drift statistics on every batch. The reference comes from random images: like the untrained
    weights, its content does not change speed."""
    export_onnx(net, path, contract_metadata(CIFAR10_CLASSES, f"bench-{name}", "0" * 64))
    embed_reference(path, np.random.default_rng(0).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8))
    return path


def median_seconds(call: Callable[[], object], budget: float = 1.5, min_runs: int = 10) -> float:
    """Median wall time of `call`, repeated for about `budget` seconds after a warm-up."""
    for _ in range(3):
        call()
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while time.perf_counter() < deadline or len(times) < min_runs:
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def raw_numbers(net: torch.nn.Module, onnx_path: Path) -> dict[str, float]:
    """Milliseconds per call and images per second: ONNX Runtime as the server configures it by default (one
    thread per core), ONNX Runtime on one thread (`ort1_`), and PyTorch eager."""
    models = {
        prefix: load_model(str(onnx_path), Settings(model_uri=str(onnx_path), ort_intra_op_threads=threads))
        for prefix, threads in (("ort", 0), ("ort1", 1))
    }
    result: dict[str, float] = {}
    for batch in (1, 64):
        images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
        tensor = torch.from_numpy(images)
        calls = {"torch": lambda: net(tensor)}  # noqa: B023 - called within the iteration
        calls |= {prefix: (lambda m=model: m.logits(images)) for prefix, model in models.items()}  # noqa: B023
        for prefix, call in calls.items():
            with torch.no_grad():
                seconds = median_seconds(call)
            result[f"{prefix}_b{batch}_ms"] = 1000 * seconds
            result[f"{prefix}_b{batch}_ips"] = batch / seconds
        if batch == 64:
            result["ort_b64_cpu_ms"] = cpu_ms_per_image(calls["ort"], batch)
    result["ort_vs_torch_b1"] = result["torch_b1_ms"] / result["ort_b1_ms"]
    return result


def cpu_ms_per_image(call: Callable[[], object], batch: int, budget: float = 1.0) -> float:
    """This process's CPU time (every thread) per image over calls for about `budget` seconds."""
    cpu, calls, deadline = time.process_time(), 0, time.perf_counter() + budget
    while time.perf_counter() < deadline or calls < 3:
        call()
        calls += 1
    return 1000 * (time.process_time() - cpu) / (calls * batch)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


Request = Callable[[int, bytes], bytes]  # (port, JPEG) -> the prepared HTTP request


@dataclass(frozen=True)
class Spec:
    """How to start a server (`command`, "{port}" replaced by its port) and what to send it: per row label
    suffix ("" for the JPEG rows), the request."""

    command: list[str]
    env: dict[str, str]
    probe: str
    requests: dict[str, Request]


def uvicorn(*app: str) -> list[str]:
    return [sys.executable, "-m", "uvicorn", *app, "--host", HOST, "--port", "{port}", "--no-access-log"]


def jpeg_upload(path: str, field: str) -> Request:
    return lambda port, image: multipart_request(HOST, port, path, image, field)


def uint8_tensor(path: str) -> Request:
    """The image decoded as the service decodes it, as a v2 UINT8 [1, 32, 32, 3] binary tensor."""
    tensor = ("images", "UINT8", [1, 32, 32, 3])
    return lambda port, image: v2_binary_request(
        HOST, port, path, tensor, decode_image(image, MAX_PIXELS).tobytes(), "probabilities"
    )


@contextmanager
def server(spec: Spec) -> Iterator[tuple[int, int]]:
    """A server subprocess on loopback: (port, pid); stopped with SIGTERM on exit."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in spec.command]
    env = {**os.environ, **{name: value.replace("{port}", str(port)) for name, value in spec.env.items()}}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://{HOST}:{port}{spec.probe}", timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(command)} did not start") from None
                time.sleep(0.2)
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(30)


def ours(model: Path, **settings: str) -> Spec:
    env = {"MODEL_URI": str(model), "MODEL_NAME": V2_NAME, **{k.upper(): v for k, v in settings.items()}}
    v2 = f"/v2/models/{V2_NAME}/infer"
    return Spec(
        uvicorn("serve.app:create_app", "--factory"),
        env,
        "/readyz",
        {"": jpeg_upload("/v1/predict", "files"), BINARY: uint8_tensor(v2)},
    )


def ours_at(tree: Path, model: Path) -> Spec:
    """Our server as another checkout's serve/ has it: uvicorn imports the app from `tree` first."""
    spec = ours(model)
    return Spec(
        uvicorn("--app-dir", str(tree), "serve.app:create_app", "--factory"),
        spec.env,
        spec.probe,
        {"": spec.requests[""]},
    )


@contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A detached git worktree of `revision`, removed afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), revision], cwd=ROOT, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


def floor(model: Path) -> Spec:
    return Spec(
        uvicorn("benchmarks.serving.floor_server:app"),
        {"MODEL_URI": str(model)},
        "/readyz",
        {"": jpeg_upload("/v1/predict", "files")},
    )


def baseline(net: str, weights: Path) -> Spec:
    env = {"BASELINE_NET": net, "BASELINE_WEIGHTS": str(weights)}
    return Spec(uvicorn("benchmarks.serving.baseline_server:app"), env, "/docs", {"": jpeg_upload("/predict", "file")})


def peer_python(peer: str) -> Path:
    """The interpreter of a peer's virtual environment (make peer-venvs); a clear error when it is missing."""
    python = PEER_VENVS / peer / "bin" / "python"
    if not (PEER_VENVS / peer / ".installed").exists():
        raise SystemExit(f"error: {PEER_VENVS / peer} is missing or incomplete: run make peer-venvs (or --no-peers)")
    return python


def bentoml_peer(model: Path) -> Spec:
    """BentoML 1.4 (peer_bentoml.py): its adaptive batcher, one worker, access log off."""
    bentoml = str(peer_python("bentoml").parent / "bentoml")
    command = [bentoml, "serve", "benchmarks.serving.peer_bentoml:Classifier", "--host", HOST, "--port", "{port}"]
    env = {"MODEL_URI": str(model), "BENTOML_DO_NOT_TRACK": "True"}
    return Spec(command, env, "/readyz", {"": jpeg_upload("/predict", "images")})


def triton_peer(model: Path) -> Spec:
    """Triton through PyTriton (peer_pytriton.py): its dynamic batcher; JPEGs as a BYTES tensor, and uint8 tensors.
    Ready once its last model (jpeg) is: Triton says ready before PyTriton has bound its models. Its
    Python-backend stub loads libpython from the system's folders: LD_LIBRARY_PATH points it at the
    interpreter's own."""
    python = peer_python("pytriton")
    libdir = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    library_path = ":".join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    env = {"MODEL_URI": str(model), "HTTP_PORT": "{port}", "LD_LIBRARY_PATH": library_path}

    def jpeg(port: int, image: bytes) -> bytes:
        data = len(image).to_bytes(4, "little") + image  # a BYTES element: its length, then its bytes
        return v2_binary_request(HOST, port, "/v2/models/jpeg/infer", ("jpeg", "BYTES", [1, 1]), data, "probabilities")

    requests = {"": jpeg, BINARY: uint8_tensor("/v2/models/images/infer")}
    return Spec([str(python), "-m", "benchmarks.serving.peer_pytriton"], env, "/v2/models/jpeg/ready", requests)


@dataclass(frozen=True)
class Running:
    """A server under test: its port, its process id and the prediction request it answers."""

    port: int
    pid: int
    request: bytes


@contextmanager
def running(specs: dict[str, Spec], image: bytes) -> Iterator[dict[str, Running]]:
    """Every server in `specs` started at once, for the whole comparison, so that they can take turns; one entry
    per server and request (label + suffix)."""
    with ExitStack() as stack:
        servers = {}
        for label, spec in specs.items():
            port, pid = stack.enter_context(server(spec))
            for suffix, request in spec.requests.items():
                servers[label + suffix] = Running(port, pid, request(port, image))
        yield servers


def take_turns(servers: dict[str, Running], concurrencies: list[int], duration: float) -> dict[str, list[dict]]:
    """One pass: at each concurrency, each server in turn, so a noisy spell on the machine lands on all of them
    rather than on one. Per server, its rows."""
    rows: dict[str, list[dict]] = {label: [] for label in servers}
    for concurrency in concurrencies:
        for label, target in servers.items():
            rows[label].append(http_row(target, concurrency, duration))
            print(f"  {label:28s} c={concurrency:<3} {_fmt(rows[label][-1])}", flush=True)
    return rows


def http_row(target: Running, concurrency: int, duration: float) -> dict[str, float]:
    """Latency, throughput and CPU time per request of server and load generator, after a short warm-up."""
    asyncio.run(run_load(HOST, target.port, target.request, concurrency, duration=min(1.0, duration)))
    server_cpu, client_cpu = _cpu_seconds(target.pid), time.process_time()
    row = asyncio.run(run_load(HOST, target.port, target.request, concurrency, duration=duration)).summary()
    answered = max(1, row["requests"] + row["errors"])
    row["server_cpu_ms"] = 1000 * (_cpu_seconds(target.pid) - server_cpu) / answered
    row["client_cpu_ms"] = 1000 * (time.process_time() - client_cpu) / answered
    return row


def median_of_passes(passes: list[dict]) -> dict:
    """Each raw number and each HTTP figure as its median over the passes. The passes run one after the other,
    each raw measurement next to its HTTP runs, so a noisy minute moves one pass, not the table."""
    raw = {key: statistics.median(p["raw"][key] for p in passes) for key in passes[0]["raw"]}
    http = {server: median_rows([p["http"][server] for p in passes]) for server in passes[0]["http"]}
    return {"raw": raw, "http": http}


def median_rows(passes: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Rows of HTTP figures (one list per pass, the same concurrencies in each): medians; requests and errors
    summed."""
    merged = []
    for rows in zip(*passes, strict=True):
        row = {key: statistics.median(r[key] for r in rows) for key in MEDIAN_KEYS}
        row["concurrency"] = rows[0]["concurrency"]
        row["requests"] = sum(r["requests"] for r in rows)
        row["errors"] = sum(r["errors"] for r in rows)
        merged.append(row)
    return merged


def compare_settings(
    specs: dict[str, Spec], image: bytes, duration: float, repeats: int, concurrency: Sequence[int] = (1, 64)
) -> dict[str, list]:
    """Our server under each setting at each concurrency, taking turns; medians over the passes."""
    only_jpeg = {label: Spec(s.command, s.env, s.probe, {"": s.requests[""]}) for label, s in specs.items()}
    with running(only_jpeg, image) as servers:
        passes = [take_turns(servers, list(concurrency), duration) for _ in range(repeats)]
    return {label: median_rows([one[label] for one in passes]) for label in specs}


def load_run(spec: Spec, image: bytes, total: int, concurrency: int) -> dict[str, object]:
    """`total` requests at `concurrency`; the server's RSS after every 1,000."""
    with server(spec) as (port, pid):
        rss: list[int] = []

        def sample(done: int) -> None:
            if done % 1000 == 0:
                rss.append(rss_bytes(pid))

        result = asyncio.run(
            run_load(HOST, port, spec.requests[""](port, image), concurrency, total=total, on_progress=sample)
        )
    summary = result.summary()
    first, last = rss[0], rss[-1]
    return {**summary, "rss_mb": [round(r / 2**20, 1) for r in rss], "rss_growth": (last - first) / first}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of a process and its descendants alive now (every thread), from /proc:
    BentoML and Triton serve from child processes. A child's time counts from when it is first seen, as
    http_row takes differences over a run in which the servers' processes do not change."""
    total = 0.0
    for process in _tree(pid):
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # ended since it was listed
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15
    return total


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants, from each thread's /proc children list."""
    found, pending = [], [pid]
    while pending:
        process = pending.pop()
        found.append(process)
        for children in Path(f"/proc/{process}/task").glob("*/children"):
            try:
                pending += [int(child) for child in children.read_text().split()]
            except FileNotFoundError:
                continue
    return found


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _fmt(row: dict[str, float]) -> str:
    return (
        f"{row['throughput_rps']:8.1f} req/s  p50 {row['p50_ms']:7.2f} ms  p99 {row['p99_ms']:7.2f} ms  "
        f"errors {row['errors']}  CPU ms/req server {row['server_cpu_ms']:.2f} client {row['client_cpu_ms']:.2f}"
    )


def test_image() -> bytes:
    with tarfile.open(SAMPLE) as archive:
        for member in archive:
            if member.isfile() and "/test/" in member.name:
                handle = archive.extractfile(member)
                assert handle is not None
                return handle.read()
    raise SystemExit(f"no test image in {SAMPLE}")


def markdown(report: dict) -> str:
    lines = [
        f"# Serving benchmark ({report['machine']})",
        "",
        "Untrained weights (speed does not depend on them). One uvicorn worker per server; the load generator "
        f"runs on the same machine. Every table but the load run shows medians over {report['repeats']} passes: "
        "in each, the raw model, then at each concurrency the servers (or the settings compared) in turn, "
        "all started beforehand. The machine may be shared, so treat small differences as noise.",
        "",
        "## Raw model, one process",
        "",
        "| network | ORT b1 ms | torch b1 ms | ORT vs torch b1 | ORT b64 img/s | ORT b64 CPU ms/img | "
        "torch b64 img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["models"].items():
        raw = entry["raw"]
        lines.append(
            f"| {name} | {raw['ort_b1_ms']:.2f} | {raw['torch_b1_ms']:.2f} | {raw['ort_vs_torch_b1']:.2f}x | "
            f"{raw['ort_b64_ips']:.0f} | {raw['ort_b64_cpu_ms']:.2f} | {raw['torch_b64_ips']:.0f} |"
        )
    lines += [
        "",
        "## Through HTTP (one JPEG per request)",
        "",
        "The floor is uvicorn and a bare ASGI callable around the service's decoder, micro-batcher and model, "
        "without FastAPI, validation, logs or metrics (benchmarks/serving/floor_server.py): the distance from it "
        "to raw ONNX Runtime is the machine's, uvicorn's and the decoder's; from the service to it, ours.",
        "",
        "p50 - raw b1: over its own runtime at batch 1 (PyTorch for the baseline, ONNX Runtime for the others). "
        "CPU ms/req: the CPU time (every thread) the server process, and the load generator beside it, spent per "
        "request; cores busy: both together times req/s, out of the machine's "
        f"{report['cores']}.",
        "",
        *cpu_budget_lines(report),
        "",
        "| network | server | concurrency | req/s | p50 ms | p50 - raw b1 ms | p99 ms | errors | vs raw ORT b64 "
        "| p99 / (c / req/s) | server CPU ms/req | client CPU ms/req | cores busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in report["models"].items():
        for server_name, rows in entry["http"].items():
            for row in rows:
                ratio = row["throughput_rps"] / entry["raw"]["ort_b64_ips"]
                bound = row["p99_ms"] / (1000 * row["concurrency"] / max(row["throughput_rps"], 1e-9))
                raw_b1 = entry["raw"]["torch_b1_ms" if server_name == BASELINE else "ort_b1_ms"]
                over_raw = f"{row['p50_ms'] - raw_b1:+.2f}" if row["concurrency"] == 1 else "-"
                cpu_ms = row["server_cpu_ms"] + row["client_cpu_ms"]
                lines.append(
                    f"| {name} | {server_name} | {row['concurrency']} | {row['throughput_rps']:.0f} | "
                    f"{row['p50_ms']:.2f} | {over_raw} | {row['p99_ms']:.2f} | {row['errors']} | {ratio:.2f}x | "
                    f"{bound:.2f} | {row['server_cpu_ms']:.2f} | {row['client_cpu_ms']:.2f} | "
                    f"{cpu_ms * row['throughput_rps'] / 1000:.2f} |"
                )
    lines += standing_lines(report)
    if "spin" in report:
        lines += [
            "",
            "## ONNX Runtime spin-waiting (airbench, our server)",
            "",
            "| spin | concurrency | req/s | p50 ms | p99 ms |",
            "|---|---|---|---|---|",
        ]
        for setting, rows in report["spin"].items():
            for row in rows:
                lines.append(
                    f"| {setting} | {row['concurrency']} | {row['throughput_rps']:.0f} | {row['p50_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} |"
                )
        lines += [  # compare_ort_settings measures the threads along with spin-waiting
            "",
            "## ONNX Runtime threads (our server): one per core vs one, the other core left to the event loop",
            "",
            "| network | threads | concurrency | req/s | p50 ms | p99 ms | raw ORT b1 ms | raw ORT b64 img/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in report["models"].items():
            for setting, rows in entry["threads"].items():
                prefix = "ort1" if setting == "1" else "ort"
                for row in rows:
                    lines.append(
                        f"| {name} | {setting} | {row['concurrency']} | {row['throughput_rps']:.0f} | "
                        f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {entry['raw'][f'{prefix}_b1_ms']:.2f} | "
                        f"{entry['raw'][f'{prefix}_b64_ips']:.0f} |"
                    )
    if "prediction_log" in report:
        lines += [
            "",
            "## The prediction log's cost (the first network, our server; every image logged to a local folder)",
            "",
            f"{report['prediction_log_records']} predictions logged in all.",
            "",
            "| prediction log | concurrency | req/s | p50 ms | p99 ms | server CPU ms/req |",
            "|---|---|---|---|---|---|",
        ]
        for setting, rows in report["prediction_log"].items():
            for row in rows:
                lines.append(
                    f"| {setting} | {row['concurrency']} | {row['throughput_rps']:.0f} | {row['p50_ms']:.2f} | "
                    f"{row['p99_ms']:.2f} | {row['server_cpu_ms']:.2f} |"
                )
    if "load" in report:
        load = report["load"]
        lines += [
            "",
            f"## Load run: {load['requests'] + load['errors']} requests at concurrency {load['concurrency']}",
            "",
            f"{load['errors']} errors, {load['throughput_rps']:.0f} req/s, p50 {load['p50_ms']:.2f} ms, "
            f"p99 {load['p99_ms']:.2f} ms. Server RSS every 1,000 requests (MB): {load['rss_mb']}; growth first to "
            f"last thousand: {100 * load['rss_growth']:.1f}%.",
        ]
    return "\n".join(lines) + "\n"


def standing_lines(report: dict) -> list[str]:
    """The service's throughput over the floor's and over each other server's, per network and concurrency."""
    lines = ["", "## The service's throughput over each other server's (JPEG rows; v2 binary over v2 binary)", ""]
    for name, entry in report["models"].items():
        http = entry["http"]
        for index, row in enumerate(http[OURS]):
            others = [label for label in http if label != OURS and not label.endswith(BINARY)]
            ratios = [f"{label} {row_of(http, label, index, ''):.2f}x" for label in others]
            if TRITON + BINARY in http and OURS + BINARY in http:
                ratios.append(f"{TRITON + BINARY} {row_of(http, TRITON, index, BINARY):.2f}x")
            lines.append(f"- {name}, concurrency {row['concurrency']}: over " + ", ".join(ratios))
    return lines


def row_of(http: dict[str, list[dict]], label: str, index: int, suffix: str) -> float:
    """Our throughput over `label`'s (both with `suffix`) at the `index`th concurrency."""
    theirs = http[label + suffix][index]["throughput_rps"]
    return http[OURS + suffix][index]["throughput_rps"] / max(theirs, 1e-9)


def cpu_budget_lines(report: dict) -> list[str]:
    """What the throughput target leaves per request: at THROUGHPUT_TARGET x raw ORT b64 with every core busy,
    the CPU time a request may take, server and load generator together, against what the model alone takes."""
    lines = []
    for name, entry in report["models"].items():
        raw, cores = entry["raw"], report["cores"]
        target = THROUGHPUT_TARGET * raw["ort_b64_ips"]
        budget = 1000 * cores / target
        lines.append(
            f"- CPU budget, {name}: {THROUGHPUT_TARGET}x raw ORT b64 is {target:.0f} req/s; with all {cores} cores "
            f"busy a request may then take {budget:.2f} ms of CPU, server and load generator together. The model "
            f"alone takes {raw['ort_b64_cpu_ms']:.2f} ms per image at batch 64, which leaves "
            f"{budget - raw['ort_b64_cpu_ms']:.2f} ms for everything else."
        )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="serving benchmark: serve/ vs a PyTorch-eager baseline and a floor")
    parser.add_argument("--models", nargs="+", default=["airbench", "resnet18"], choices=["airbench", "resnet18"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument(
        "--repeats", type=int, default=3, help="passes over the raw and HTTP measurements; the tables show medians"
    )
    parser.add_argument("--load-requests", type=int, default=10_000, help="0 skips the load run")
    parser.add_argument("--load-concurrency", type=int, default=32)
    parser.add_argument(
        "--settings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare ONNX Runtime spin-waiting on vs off and one thread vs one per core",
    )
    parser.add_argument(
        "--prediction-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compare our server without and with the prediction log (PREDICTION_LOG_URL, a local folder)",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BentoML and Triton (PyTriton) beside the others, from their virtual environments (make peer-venvs)",
    )
    parser.add_argument(
        "--base-revision",
        help="a git revision whose serve/ joins the comparison (with today's model files), to show a change's cost",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving" / "results")
    args = parser.parse_args(argv)
    if 0 < args.load_requests < 2000:
        parser.error("--load-requests: 0 (no load run) or at least 2000; memory is sampled every 1,000 requests")
    torch.manual_seed(0)
    image = test_image()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    report: dict = {"machine": machine, "cores": os.cpu_count(), "repeats": args.repeats, "models": {}}
    with tempfile.TemporaryDirectory() as scratch, ExitStack() as stack:
        files = Path(scratch)
        base = stack.enter_context(checkout(args.base_revision)) if args.base_revision else None
        if args.base_revision:
            report["base_revision"] = args.base_revision
        for name in args.models:
            net = build(name)
            onnx_path = export_like_training(net, files / f"{name}.onnx", name)
            torch.save(net.state_dict(), files / f"{name}.pt")
            specs = {OURS: ours(onnx_path), FLOOR: floor(onnx_path), BASELINE: baseline(name, files / f"{name}.pt")}
            if args.peers:
                specs |= {BENTOML: bentoml_peer(onnx_path), TRITON: triton_peer(onnx_path)}
            if base is not None:
                specs[f"onnx (serve/ at {args.base_revision})"] = ours_at(base, onnx_path)
            passes = []
            with running(specs, image) as servers:  # idle while the raw model is measured
                for repeat in range(args.repeats):
                    print(f"{name}, pass {repeat + 1} of {args.repeats}", flush=True)
                    raw = raw_numbers(net, onnx_path)
                    passes.append({"raw": raw, "http": take_turns(servers, args.concurrency, args.duration)})
            report["models"][name] = {**median_of_passes(passes), "passes": passes}
        first = args.models[0]
        if args.settings:
            compare_ort_settings(report, files, image, args.duration, args.repeats)
        if args.prediction_log:
            print(f"{first}: without and with the prediction log", flush=True)
            model, log = files / f"{first}.onnx", str(files / "prediction-log")
            logged = {"no log (default)": ours(model), "prediction log": ours(model, prediction_log_url=log)}
            report["prediction_log"] = compare_settings(logged, image, args.duration, args.repeats, (16, 64))
            report["prediction_log_records"] = sum(
                len(batch.read_text().splitlines()) for batch in Path(log).glob("batches/*/*.jsonl")
            )
        if args.load_requests:
            print(
                f"{first}: load run, {args.load_requests} requests at concurrency {args.load_concurrency}", flush=True
            )
            report["load"] = load_run(ours(files / f"{first}.onnx"), image, args.load_requests, args.load_concurrency)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve.json").write_text(json.dumps(report, indent=2))
    (args.out / "serve.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'serve.json'} and {args.out / 'serve.md'}")
    return report


def compare_ort_settings(report: dict, files: Path, image: bytes, duration: float, repeats: int) -> None:
    """Spin-waiting off vs on (the first network), one ONNX Runtime thread vs one per core (each network)."""
    names = list(report["models"])
    print(f"{names[0]}: ONNX Runtime spin-waiting off vs on", flush=True)
    model = files / f"{names[0]}.onnx"
    spin = {"off (default)": ours(model), "on": ours(model, ort_spin_wait="1")}
    report["spin"] = compare_settings(spin, image, duration, repeats)
    for name in names:
        print(f"{name}: ONNX Runtime threads, one per core vs one (a core left to the event loop)", flush=True)
        model = files / f"{name}.onnx"
        threads = {"one per core (default)": ours(model), "1": ours(model, ort_intra_op_threads="1")}
        report["models"][name]["threads"] = compare_settings(threads, image, duration, repeats)


if __name__ == "__main__":
    main()
