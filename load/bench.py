"""Benchmark the gateway against the fake vLLM: direct versus through the gateway, side by side.

    .venv/bin/python load/bench.py [--seconds 5] [--out load/results]

The fake upstream and this load client share CPU 0; the gateway has CPU 1 to itself (taskset),
so the gateway's own cost is what the difference shows. Results go to
load/results/<date>.md. Peers (nginx, vllm-router, LiteLLM) are not part of this run yet.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import run

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    body: dict[str, object]
    path: str = "/v1/chat/completions"


def scenarios() -> list[Scenario]:
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    big_input = ["x" * 1000] * 64  # ~64 KB of JSON
    return [
        Scenario("chat, non-stream, c=1", 1, chat),
        Scenario("chat, non-stream, c=16", 16, chat),
        Scenario("chat, non-stream, c=64", 64, chat),
        Scenario("stream, 64 chunks, c=16", 16, {**chat, "stream": True, "fake": {"chunks": 64}}),
        Scenario(
            "stream, 16 chunks 5 ms apart, c=64",
            64,
            {**chat, "stream": True, "fake": {"chunks": 16, "gap_ms": 5}},
        ),
        Scenario(
            "embeddings, 64 KB body, c=16",
            16,
            {"model": "fake", "input": big_input},
            "/v1/embeddings",
        ),
    ]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if os.cpu_count() and os.cpu_count() > 1 else cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--out", default=str(ROOT / "load" / "results"))
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})

    fake_port, gw_port = 19301, 19302
    fake = subprocess.Popen(
        pinned(
            0,
            [
                sys.executable,
                str(ROOT / "load" / "fake_vllm.py"),
                "--port",
                str(fake_port),
                "--served-model-name",
                "fake",
            ],
        ),
        stdout=subprocess.DEVNULL,
    )
    config = {
        "models": [{"name": "fake", "url": f"http://127.0.0.1:{fake_port}"}],
        "log_level": "warning",
    }
    config_file = Path(tempfile.mkdtemp()) / "bench.yaml"
    config_file.write_text(yaml.safe_dump(config))
    gateway = subprocess.Popen(
        pinned(
            1,
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(config_file),
                "--port",
                str(gw_port),
            ],
        ),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{fake_port}/health")
        wait_http(f"http://127.0.0.1:{gw_port}/health")
        idle_rss = rss_mb(gateway.pid)
        for scenario in scenarios():
            body = json.dumps(scenario.body).encode()
            direct = asyncio.run(
                run(
                    f"http://127.0.0.1:{fake_port}{scenario.path}",
                    body,
                    scenario.concurrency,
                    args.seconds,
                )
            ).summary()
            cpu_before = cpu_seconds(gateway.pid)
            result = asyncio.run(
                run(
                    f"http://127.0.0.1:{gw_port}{scenario.path}",
                    body,
                    scenario.concurrency,
                    args.seconds,
                    warmup=0,
                )
            )
            cpu = cpu_seconds(gateway.pid) - cpu_before
            via = result.summary()
            via["cpu_us_per_request"] = cpu / max(1, via["requests"]) * 1e6
            via["cpu_us_per_event"] = (cpu / result.events * 1e6) if result.events else None
            via["rss_mb"] = rss_mb(gateway.pid)
            rows.append((scenario, direct, via))
            print(
                f"{scenario.name}: direct {direct['rps']:.0f} rps p50 {direct['p50_ms']:.2f} ms"
                f" | gateway {via['rps']:.0f} rps p50 {via['p50_ms']:.2f} ms"
                f" p99 {via['p99_ms']:.2f} ms, {via['cpu_us_per_request']:.0f} us CPU/request",
                flush=True,
            )
    finally:
        for proc in (gateway, fake):
            proc.terminate()
            proc.wait(10)
    write_report(Path(args.out), rows, idle_rss, args.seconds)


def write_report(out: Path, rows: list, idle_rss: float, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    lines = [
        f"# Gateway overhead, {today}",
        "",
        f"`load/bench.py --seconds {seconds:g}`: fake vLLM upstream and load client on CPU 0, the "
        f"gateway alone on CPU 1 (taskset), one gateway worker, {platform.python_version()}, "
        f"{os.cpu_count()} cores. Closed loop, {seconds:g} s per run after a 1 s warm-up "
        "(direct only). Latencies in ms.",
        "",
        "| scenario | direct rps | direct p50 / p99 | gateway rps | gateway p50 / p99 | added p50 "
        "| TTFB p50 direct / gateway | gateway CPU µs/request | CPU µs per SSE event | errors "
        "| RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, d, g in rows:
        per_event = f"{g['cpu_us_per_event']:.1f}" if g["cpu_us_per_event"] else "-"
        lines.append(
            f"| {scenario.name} | {d['rps']:.0f} | {d['p50_ms']:.2f} / {d['p99_ms']:.2f} "
            f"| {g['rps']:.0f} | {g['p50_ms']:.2f} / {g['p99_ms']:.2f} "
            f"| {g['p50_ms'] - d['p50_ms']:+.2f} | {d['ttfb_p50_ms']:.2f} / {g['ttfb_p50_ms']:.2f} "
            f"| {g['cpu_us_per_request']:.0f} | {per_event} | {g['errors'] + d['errors']} "
            f"| {g['rss_mb']:.0f} |"
        )
    lines += [
        "",
        f"Idle gateway RSS: {idle_rss:.0f} MB. CPU per SSE event is the gateway's CPU time over "
        "the events relayed, so it includes each request's own cost spread over its events.",
        "",
    ]
    path = out / f"{today}.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
