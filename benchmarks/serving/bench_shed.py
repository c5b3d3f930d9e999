"""Load shedding benchmark: our server with a latency objective (MAX_LATENCY_MS), offered twice what it can
answer. Writes JSON and a Markdown table.

    python -m benchmarks.serving.bench_shed                      # make bench-shed
    python -m benchmarks.serving.bench_shed --duration 3 --objective-ms 150

First the server's capacity: its throughput in a closed loop (the best of concurrency 16 and 64). Then an open
loop sends requests at `--overload` times that rate, whatever the answers, on as many connections as it takes,
for `--duration` seconds, sampling the server's resident memory every half second. The issue's marks: the accepted
requests' p99 within the objective, their throughput at least 95% of the capacity, and memory flat; every request
answered 200 or a 503 (shed), none lost or failed otherwise.
"""

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.serving.bench_serve import (
    HOST,
    ROOT,
    Running,
    export_like_training,
    http_row,
    ours,
    rss_bytes,
    server,
    test_image,
)
from benchmarks.serving.loadgen import read_response
from benchmarks.serving.nets import build


@dataclass
class OpenLoopResult:
    offered: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, the requests answered 200
    shed: int = 0  # 503
    failed: int = 0  # any other status, or a connection lost
    seconds: float = 0.0


async def open_loop(port: int, request: bytes, rate: float, duration: float) -> OpenLoopResult:
    """Requests sent at `rate` per second for `duration` seconds, each on a free keep-alive connection (a new one
    when none is free), without waiting for earlier answers; then every answer awaited."""
    result, free = OpenLoopResult(), []
    pending: set[asyncio.Task] = set()

    async def one() -> None:
        reader, writer = free.pop() if free else await asyncio.open_connection(HOST, port)
        started = time.perf_counter()
        writer.write(request)
        try:
            status = await read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            result.failed += 1
            writer.close()
            return
        if status == 200:
            result.latencies.append(time.perf_counter() - started)
        elif status == 503:
            result.shed += 1
        else:
            result.failed += 1
        free.append((reader, writer))

    started = time.perf_counter()
    while (now := time.perf_counter()) < started + duration:
        due = int((now - started) * rate) - result.offered  # every request whose time has come
        for _ in range(due):
            task = asyncio.create_task(one())
            pending.add(task)
            task.add_done_callback(pending.discard)
        result.offered += max(due, 0)
        await asyncio.sleep(0.001)
    await asyncio.gather(*pending)
    result.seconds = time.perf_counter() - started
    for _, writer in free:
        writer.close()
    return result


def percentile(latencies: list[float], fraction: float) -> float:
    ordered = sorted(latencies)
    return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def overloaded(
    port: int, pid: int, request: bytes, rate: float, duration: float
) -> tuple[OpenLoopResult, list[int]]:
    """The open loop, and the server's RSS every half second meanwhile."""
    rss: list[int] = []

    async def sample() -> None:
        while True:
            rss.append(rss_bytes(pid))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    try:
        result = await open_loop(port, request, rate, duration)
    finally:
        sampler.cancel()
    return result, rss


def measure(model: Path, image: bytes, objective_ms: float, overload: float, duration: float) -> dict:
    spec = ours(model, max_latency_ms=str(objective_ms))
    with server(spec) as (port, pid):
        target = Running(port, pid, spec.requests[""](port, image))
        closed = [http_row(target, concurrency, duration) for concurrency in (16, 64)]
        capacity = max(row["throughput_rps"] for row in closed)
        print(f"capacity {capacity:.0f} req/s (closed loop, concurrency 16 and 64); offering {overload}x", flush=True)
        result, rss = asyncio.run(overloaded(port, pid, target.request, overload * capacity, duration))
    accepted = len(result.latencies) / result.seconds
    return {
        "objective_ms": objective_ms,
        "closed_loop": closed,
        "capacity_rps": capacity,
        "offered_rps": result.offered / result.seconds,
        "offered": result.offered,
        "accepted": len(result.latencies),
        "shed": result.shed,
        "failed": result.failed,
        "accepted_rps": accepted,
        "throughput_vs_capacity": accepted / capacity,
        "accepted_p50_ms": percentile(result.latencies, 0.5),
        "accepted_p99_ms": percentile(result.latencies, 0.99),
        "rss_mb": [round(r / 2**20, 1) for r in rss],
        "rss_growth": (rss[-1] - rss[0]) / rss[0],
    }


def markdown(report: dict) -> str:
    r = report
    marks = [
        (
            "accepted p99 within the objective",
            f"{r['accepted_p99_ms']:.1f} ms vs {r['objective_ms']:.0f} ms",
            r["accepted_p99_ms"] <= r["objective_ms"],
        ),
        (
            "accepted throughput >= 0.95x capacity",
            f"{r['throughput_vs_capacity']:.2f}x",
            r["throughput_vs_capacity"] >= 0.95,
        ),
        ("RSS flat (first to last sample)", f"{100 * r['rss_growth']:+.1f}%", abs(r["rss_growth"]) <= 0.05),
        ("every request answered 200 or 503", f"{r['failed']} otherwise", r["failed"] == 0),
    ]
    lines = [
        f"# Load shedding at {r['overload']}x capacity ({r['machine']}, load average {r['load_average']})",
        "",
        f"Our server (airbench, MAX_LATENCY_MS={r['objective_ms']:.0f}); capacity: its best closed-loop "
        f"throughput at concurrency 16 and 64, {r['capacity_rps']:.0f} req/s. Then {r['offered_rps']:.0f} req/s "
        f"offered for {r['duration_s']:.0f} s in an open loop: {r['offered']} requests, {r['accepted']} answered, "
        f"{r['shed']} shed (503), {r['failed']} failed; accepted {r['accepted_rps']:.0f} req/s, p50 "
        f"{r['accepted_p50_ms']:.1f} ms. The load generator shares the machine's cores with the server.",
        "",
        "| mark | measured | met |",
        "|---|---|---|",
        *(f"| {mark} | {value} | {'yes' if met else 'no'} |" for mark, value, met in marks),
        "",
        f"Server RSS every half second (MB): {r['rss_mb']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="load shedding at a multiple of the server's measured capacity")
    parser.add_argument("--objective-ms", type=float, default=100.0, help="MAX_LATENCY_MS of the server")
    parser.add_argument("--overload", type=float, default=2.0, help="offered rate over the measured capacity")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serving" / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        model = export_like_training(build("airbench"), Path(scratch) / "airbench.onnx", "airbench")
        report = measure(model, test_image(), args.objective_ms, args.overload, args.duration)
    report |= {
        "overload": args.overload,
        "duration_s": args.duration,
        "machine": f"{os.cpu_count()} cores",
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shed.json").write_text(json.dumps(report, indent=2))
    (args.out / "shed.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out / 'shed.json'} and {args.out / 'shed.md'}")
    return report


if __name__ == "__main__":
    main()
