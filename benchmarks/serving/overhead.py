"""What a request costs besides the model: CPU time per request of each server's ASGI app, in this process.

    python -m benchmarks.serving.overhead               # make bench-overhead
    python -m benchmarks.serving.overhead --requests 700

Each server, the service (serve/), the bare ASGI floor (floor_server.py) and the FastAPI + PyTorch-eager
baseline, answers the same JPEG with the null network (benchmarks/serving/nets.py: ten input values as the
logits), called straight through its ASGI app on the event loop uvicorn uses (uvloop): no sockets, no load
generator. What is left is the web layer, reading the upload, decoding, batching, the drift statistics, metrics,
logging and the response. The measure is the process's CPU time (every thread) per request, the median over blocks
of requests: steadier than wall time on a shared machine, and it counts the thread hops to the model. The servers
take turns block by block, so a noisy spell on the machine lands on all of them alike. At concurrency 1 each
request is its own batch; at 16, requests are in flight together, as under load.
"""

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from starlette.types import ASGIApp

from benchmarks.serving.bench_serve import ROOT, export_like_training, test_image
from benchmarks.serving.loadgen import multipart_request
from benchmarks.serving.nets import build
from serve.app import create_app
from serve.json_logs import LOGGER_NAME, JsonFormatter
from serve.settings import Settings

BLOCKS = 7


def http_scope(path: str, request: bytes) -> tuple[dict[str, Any], bytes]:
    """The ASGI scope and body of a raw HTTP/1.1 request."""
    head, body = request.split(b"\r\n\r\n", 1)
    headers = [tuple(line.split(b": ", 1)) for line in head.split(b"\r\n")[1:]]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower(), value) for name, value in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    return scope, body


async def call(app: ASGIApp, scope: dict[str, Any], body: bytes) -> int:
    """One request through the app; its status."""
    delivered = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app({**scope, "state": {}}, receive, send)
    return status


@dataclass(frozen=True)
class Target:
    """A server's ASGI app and the prediction request it answers."""

    app: ASGIApp
    scope: dict[str, Any]
    body: bytes


async def block(target: Target, rounds: int, concurrency: int) -> float:
    """CPU milliseconds per request over `rounds` rounds of `concurrency` requests at once."""
    started = time.process_time()
    for _ in range(rounds):
        statuses = await asyncio.gather(*(call(target.app, target.scope, target.body) for _ in range(concurrency)))
        if set(statuses) != {200}:
            raise RuntimeError(f"{target.scope['path']} answered {sorted(set(statuses))}")
    return 1000 * (time.process_time() - started) / (rounds * concurrency)


async def measure(targets: dict[str, Target], requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    """Per server, CPU milliseconds per request: the median and the spread over BLOCKS blocks, after a warm-up
    block each; the servers take turns."""
    rounds = max(1, requests // BLOCKS // concurrency)
    for target in targets.values():
        await block(target, rounds, concurrency)
    per_request: dict[str, list[float]] = {name: [] for name in targets}
    for _ in range(BLOCKS):
        for name, target in targets.items():
            per_request[name].append(await block(target, rounds, concurrency))
    return {
        name: {
            "concurrency": concurrency,
            "requests": BLOCKS * rounds * concurrency,
            "cpu_ms_per_request": statistics.median(values),
            "min_ms": min(values),
            "max_ms": max(values),
        }
        for name, values in per_request.items()
    }


@contextlib.asynccontextmanager
async def running(app: ASGIApp) -> AsyncIterator[None]:
    """The app between its startup and its shutdown (model loading, the batcher's worker)."""
    messages: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    started, stopped = asyncio.Event(), asyncio.Event()
    messages.put_nowait({"type": "lifespan.startup"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"].startswith("lifespan.startup"):
            started.set()
        elif message["type"].startswith("lifespan.shutdown"):
            stopped.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    lifespan = asyncio.create_task(app(scope, messages.get, send))
    await started.wait()
    try:
        yield
    finally:
        messages.put_nowait({"type": "lifespan.shutdown"})
        await stopped.wait()
        await lifespan


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run on the event loop uvicorn would pick: uvloop where it is installed (as in the image), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def servers(scratch: Path) -> dict[str, tuple[Callable[[], ASGIApp], str]]:
    """name -> (a factory of its ASGI app with the null network, the prediction path)."""
    net = build("null")
    model = export_like_training(net, scratch / "null.onnx", "null")
    weights = scratch / "null.pt"
    torch.save(net.state_dict(), weights)

    def ours() -> ASGIApp:
        app = create_app(Settings(model_uri=str(model)))
        quiet = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process; the lines are still formatted
        for handler in logging.getLogger(LOGGER_NAME).handlers:
            # the service's own handler only: pytest attaches its capture handlers to the logger as well
            if isinstance(handler, logging.StreamHandler) and isinstance(handler.formatter, JsonFormatter):
                handler.setStream(quiet)
        return app

    def floor() -> ASGIApp:
        os.environ["MODEL_URI"] = str(model)
        from benchmarks.serving.floor_server import app  # reads its settings from the environment at startup

        return app

    def baseline() -> ASGIApp:
        os.environ.update(BASELINE_NET="null", BASELINE_WEIGHTS=str(weights))
        from benchmarks.serving.baseline_server import app  # builds its network from those variables on import

        return app

    return {
        "onnx (serve/)": (ours, "/v1/predict"),
        "bare ASGI floor": (floor, "/v1/predict"),
        "torch baseline": (baseline, "/predict"),
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Cost of a request besides the model",
        "",
        "CPU milliseconds per request (all threads), in-process through each server's ASGI app, with the null "
        f"network; median of {BLOCKS} blocks (min-max). {report['machine']}.",
        "",
        "| server | concurrency | CPU ms / request | min-max | requests |",
        "|---|---|---|---|---|",
    ]
    for name, rows in report["servers"].items():
        for row in rows:
            lines.append(
                f"| {name} | {row['concurrency']} | {row['cpu_ms_per_request']:.3f} | "
                f"{row['min_ms']:.3f}-{row['max_ms']:.3f} | {row['requests']} |"
            )
    return "\n".join(lines) + "\n"


def upload_field(path: str) -> str:
    return "files" if path.startswith("/v1/") else "file"  # ours and the floor take several files; the baseline one


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="CPU time per request besides the model, each server")
    parser.add_argument("--requests", type=int, default=7_000, help="per server and concurrency")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving" / "results")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "servers": {}}
    image = test_image()
    with tempfile.TemporaryDirectory() as scratch:
        targets = {}
        for name, (factory, path) in servers(Path(scratch)).items():
            targets[name] = Target(
                factory(), *http_scope(path, multipart_request("127.0.0.1", 8000, path, image, upload_field(path)))
            )

        async def run() -> None:
            async with contextlib.AsyncExitStack() as stack:
                for target in targets.values():
                    await stack.enter_async_context(running(target.app))
                for concurrency in args.concurrency:
                    for name, row in (await measure(targets, args.requests, concurrency)).items():
                        report["servers"].setdefault(name, []).append(row)
                        print(f"{name:16s} c={concurrency:<3} {row['cpu_ms_per_request']:.3f} ms CPU", flush=True)

        run_loop(run())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2))
    (args.out / "overhead.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'overhead.json'} and {args.out / 'overhead.md'}")
    return report


if __name__ == "__main__":
    main()
