"""Soak: mixed traffic through the gateway for minutes; is its memory flat?

    .venv/bin/python load/soak.py [--minutes 10] [--out load/results]

Non-stream chat (c=16), 64-chunk streams (c=8), clients that leave mid-stream (c=4) and 64 KB
embeddings (c=4), all at once, in 10-second rounds, against the fake vLLM; the gateway's RSS is
sampled after every round. Writes load/results/soak-<date>.md: the series, and whether RSS after
the first minute stays within ±10% of its median.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import rss_mb
from loadgen import run
from peers import ROOT, start_fake, start_gateway

ROUND = 10.0


async def leave_early(url: str, body: bytes, headers: dict[str, str], seconds: float) -> int:
    """Clients that read the start of a stream and hang up: the gateway must free what it held."""
    left = 0
    deadline = time.monotonic() + seconds
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1].split("/")[0])
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body
    while time.monotonic() < deadline:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        await reader.read(256)
        writer.close()
        left += 1
    return left


async def one_round(target_url: str, headers: dict[str, str]) -> dict[str, float]:
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    stream = {**chat, "stream": True, "fake": {"chunks": 64, "gap_ms": 1}}
    slow = {**chat, "stream": True, "fake": {"chunks": 200, "gap_ms": 20}}
    embed = {"model": "fake", "input": ["x" * 1000] * 64}
    url = f"{target_url}/v1/chat/completions"
    results = await asyncio.gather(
        run(url, json.dumps(chat).encode(), 16, ROUND, warmup=0, headers=headers),
        run(url, json.dumps(stream).encode(), 8, ROUND, warmup=0, headers=headers),
        run(
            f"{target_url}/v1/embeddings",
            json.dumps(embed).encode(),
            4,
            ROUND,
            warmup=0,
            headers=headers,
        ),
        *(leave_early(url, json.dumps(slow).encode(), headers, ROUND) for _ in range(4)),
    )
    done = sum(len(r.latencies) for r in results[:3])  # type: ignore[union-attr]
    errors = sum(r.errors for r in results[:3])  # type: ignore[union-attr]
    return {"requests": done, "errors": errors, "left_early": sum(results[3:])}  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--out", default=str(ROOT / "load" / "results"))
    args = parser.parse_args()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    fake = start_fake(19501)
    gateway = start_gateway(19510, fake.url)
    samples: list[tuple[float, float, dict[str, float]]] = []
    began = time.monotonic()
    try:
        idle = rss_mb(gateway.pids)
        while time.monotonic() - began < args.minutes * 60:
            stats = asyncio.run(one_round(gateway.url, gateway.headers))
            samples.append((time.monotonic() - began, rss_mb(gateway.pids), stats))
            print(f"{samples[-1][0]:6.0f} s  RSS {samples[-1][1]:6.1f} MB  {stats}", flush=True)
    finally:
        gateway.stop()
        fake.stop()
    write(Path(args.out), idle, samples, args.minutes)


def write(
    out: Path, idle: float, samples: list[tuple[float, float, dict[str, float]]], minutes: float
) -> None:
    steady = [rss for t, rss, _ in samples if t > 60] or [rss for _, rss, _ in samples]
    median = statistics.median(steady)
    low, high = min(steady), max(steady)
    flat = high <= median * 1.1 and low >= median * 0.9
    total = sum(s["requests"] for _, _, s in samples)
    errors = sum(s["errors"] for _, _, s in samples)
    left = sum(s["left_early"] for _, _, s in samples)
    today = datetime.date.today().isoformat()
    lines = [
        f"# Soak, {today}",
        "",
        f"`load/soak.py --minutes {minutes:g}`: mixed traffic through one gateway process (CPU 1) "
        "against the fake vLLM: non-stream chat c=16, 64-chunk streams c=8, 64 KB embeddings c=4, "
        "and 4 clients that hang up after the first bytes of a long stream, in 10 s rounds.",
        "",
        f"{total} requests completed, {errors} errors, {left} streams abandoned by their client.",
        f"Idle RSS {idle:.1f} MB. After the first minute: median {median:.1f} MB, "
        f"min {low:.1f}, max {high:.1f}: "
        + ("flat within ±10%." if flat else "NOT flat within ±10%."),
        "",
        "| time s | RSS MB | requests | errors | abandoned |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t:.0f} | {rss:.1f} | {s['requests']:.0f} | {s['errors']:.0f} | {s['left_early']:.0f} |"
        for t, rss, s in samples
    ]
    path = out / f"soak-{today}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
