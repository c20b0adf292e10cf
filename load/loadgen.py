"""A closed-loop HTTP/1.1 load generator: raw asyncio sockets, keep-alive, no client library.

A client library would cost more CPU per request than the gateway under test; this one parses
only the status line, the framing headers and (for streams) the chunk sizes.

    python load/loadgen.py URL --body '{"model":"m"}' --concurrency 64 --seconds 10 [--stream]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, whole response
    ttfb: list[float] = field(default_factory=list)  # seconds, to the first body byte
    events: int = 0
    errors: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        def pct(values: list[float], q: float) -> float:
            if not values:
                return float("nan")
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

        n = len(self.latencies)
        return {
            "requests": n,
            "errors": self.errors,
            "rps": n / self.seconds if self.seconds else 0.0,
            "p50_ms": pct(self.latencies, 0.50),
            "p90_ms": pct(self.latencies, 0.90),
            "p99_ms": pct(self.latencies, 0.99),
            "ttfb_p50_ms": pct(self.ttfb, 0.50),
            "ttfb_p99_ms": pct(self.ttfb, 0.99),
            "events_per_s": self.events / self.seconds if self.seconds else 0.0,
            "mean_ms": statistics.fmean(self.latencies) * 1000 if n else float("nan"),
        }


def build_request(url: str, body: bytes, headers: dict[str, str]) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [
        f"POST {parts.path or '/'} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
    ]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader, started: float, result: Result) -> bool:
    """Read one response; True if it was a 200. Records time to first body byte and events."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, chunked = None, False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    first = True
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if first:
                result.ttfb.append(time.perf_counter() - started)
                first = False
            if size == 0:
                await reader.readline()
                break
            data = await reader.readexactly(size + 2)
            result.events += data.count(b"data: ")
    elif length is not None:
        await reader.readexactly(length)
        result.ttfb.append(time.perf_counter() - started)
    return status == 200


async def worker(
    host: str, port: int, request: bytes | Sequence[bytes], deadline: float, result: Result
) -> None:
    """One connection's requests until ``deadline``: ``request``, or each of a sequence of
    requests in turn (from a random place in it, so that workers do not walk in step)."""
    requests = [request] if isinstance(request, bytes) else list(request)
    turn = random.randrange(len(requests))
    reader = writer = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            started = time.perf_counter()
            writer.write(requests[turn % len(requests)])
            turn += 1
            assert reader is not None
            ok = await read_response(reader, started, result)
            if ok:
                result.latencies.append(time.perf_counter() - started)
            else:
                result.errors += 1
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
            result.errors += 1
            if writer is not None:
                writer.close()
            reader = writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def run(
    url: str,
    body: bytes | Sequence[bytes],
    concurrency: int,
    seconds: float,
    warmup: float = 1.0,
    headers: dict[str, str] | None = None,
) -> Result:
    """``body``: one request body, or several that each connection sends in turn."""
    bodies = [body] if isinstance(body, bytes) else list(body)
    built = [build_request(url, b, headers or {}) for b in bodies]
    host, port = built[0][0], built[0][1]
    request = [r for _, _, r in built]
    if warmup:
        await asyncio.gather(
            *(
                worker(host, port, request, time.perf_counter() + warmup, Result())
                for _ in range(min(concurrency, 64))
            )
        )
    result = Result()
    start = time.perf_counter()
    deadline = start + seconds
    workers = [
        asyncio.ensure_future(worker(host, port, request, deadline, result))
        for _ in range(concurrency)
    ]
    # A target that stops answering must not hang the run: past a grace period, what is
    # still waiting counts as an error.
    _, stuck = await asyncio.wait(workers, timeout=seconds + max(10.0, seconds))
    for task in stuck:
        task.cancel()
    result.errors += len(stuck)
    result.seconds = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--body", default='{"model":"fake"}')
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--header", action="append", default=[], help="Name: value")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    headers = dict(h.split(": ", 1) for h in args.header)
    result = asyncio.run(
        run(args.url, args.body.encode(), args.concurrency, args.seconds, headers=headers)
    )
    print(json.dumps(result.summary(), indent=2))


if __name__ == "__main__":
    main()
