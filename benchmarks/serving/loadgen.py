"""A closed-loop HTTP/1.1 load generator on raw asyncio streams: `concurrency` keep-alive connections, each
sending the same prepared request back to back. Far lighter than an HTTP client library, so on a small
machine most of the CPU is left to the server under test."""

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoadResult:
    concurrency: int
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    errors: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies)
        return {
            "concurrency": self.concurrency,
            "requests": len(ordered),
            "errors": self.errors,
            "throughput_rps": len(ordered) / self.seconds if self.seconds else 0.0,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else float("nan"),
        }


def multipart_request(host: str, port: int, path: str, blob: bytes, field: str, filename: str = "image.jpg") -> bytes:
    """A POST of `blob` as the one file of the multipart form field `field`."""
    boundary = "cifarlabbench"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


def v2_binary_request(
    host: str, port: int, path: str, tensor: tuple[str, str, list[int]], data: bytes, output: str
) -> bytes:
    """An Open Inference Protocol (v2) infer request with its one input, (name, datatype, shape), as binary tensor
    data, asking for `output` as binary too (as tritonclient does by default)."""
    name, datatype, shape = tensor
    inputs = [{"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": len(data)}}]
    header = json.dumps({"inputs": inputs, "outputs": [{"name": output, "parameters": {"binary_data": True}}]})
    body = header.encode() + data
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def run_load(
    host: str,
    port: int,
    request: bytes,
    concurrency: int,
    duration: float | None = None,
    total: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> LoadResult:
    """Send until `duration` seconds have passed, or until `total` requests have been answered."""
    result = LoadResult(concurrency)
    sent = 0
    deadline = time.perf_counter() + duration if duration else float("inf")

    def more() -> bool:
        nonlocal sent
        if time.perf_counter() >= deadline or (total is not None and sent >= total):
            return False
        sent += 1
        return True

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while more():
                started = time.perf_counter()
                writer.write(request)
                try:
                    status = await read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    result.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                if status == 200:
                    result.latencies.append(time.perf_counter() - started)
                else:
                    result.errors += 1
                done = len(result.latencies) + result.errors
                if on_progress:
                    on_progress(done)
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result
