"""What a request costs besides the model: CPU time per request of each server's ASGI app, in this process.

    python -m benchmarks.serving.overhead               # make bench-overhead
    python -m benchmarks.serving.overhead --requests 700

Each server, the service (serve/), the bare ASGI floor (floor_server.py) and the FastAPI + PyTorch-eager
baseline, answers the same JPEG with the null network (benchmarks/serving/nets.py: ten input values as the
logits), called straight through its ASGI app on the event loop uvicorn uses (uvloop): no sockets, no load
generator. What is left is the web layer, reading the upload, decoding, batching, the drift statistics, metrics,
logging and the response. The measure is the process's CPU time (every thread) per request, the median over blocks
of requests: steadier than wall time on a shared machine, and it counts the thread hops to the model. At
concurrency 1 each request is its own batch; at 16, requests are in flight together, as under load.
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import torch
from starlette.types import ASGIApp

from benchmarks.serving.bench_serve import ROOT, export_like_training, test_image
from benchmarks.serving.loadgen import multipart_request
from benchmarks.serving.nets import build
from serve.app import create_app
from serve.logging import LOGGER_NAME, JsonFormatter
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


async def measure(
    app: ASGIApp, scope: dict[str, Any], body: bytes, requests: int, concurrency: int
) -> dict[str, float]:
    """CPU milliseconds per request: the median and the spread over BLOCKS blocks, after a warm-up."""
    rounds = max(1, requests // BLOCKS // concurrency)

    async def block() -> float:
        started = time.process_time()
        for _ in range(rounds):
            statuses = await asyncio.gather(*(call(app, scope, body) for _ in range(concurrency)))
            if set(statuses) != {200}:
                raise RuntimeError(f"{scope['path']} answered {sorted(set(statuses))}")
        return 1000 * (time.process_time() - started) / (rounds * concurrency)

    await block()  # warm-up
    per_request = [await block() for _ in range(BLOCKS)]
    return {
        "concurrency": concurrency,
        "requests": BLOCKS * rounds * concurrency,
        "cpu_ms_per_request": statistics.median(per_request),
        "min_ms": min(per_request),
        "max_ms": max(per_request),
    }


async def with_lifespan(app: ASGIApp, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` between the app's startup and shutdown (model loading, the batcher's worker)."""
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
        return await work()
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="CPU time per request besides the model, each server")
    parser.add_argument("--requests", type=int, default=7_000, help="per server and concurrency")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving" / "results")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} cores", "servers": {}}
    image = test_image()
    with tempfile.TemporaryDirectory() as scratch:
        for name, (factory, path) in servers(Path(scratch)).items():
            app = factory()
            scope, body = http_scope(path, multipart_request("127.0.0.1", 8000, path, image))

            async def run(app: ASGIApp = app, scope: dict = scope, body: bytes = body) -> list[dict[str, float]]:
                return [await measure(app, scope, body, args.requests, c) for c in args.concurrency]

            report["servers"][name] = run_loop(with_lifespan(app, run))
            for row in report["servers"][name]:
                print(f"{name:16s} c={row['concurrency']:<3} {row['cpu_ms_per_request']:.3f} ms CPU", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(report, indent=2))
    (args.out / "overhead.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'overhead.json'} and {args.out / 'overhead.md'}")
    return report


if __name__ == "__main__":
    main()
