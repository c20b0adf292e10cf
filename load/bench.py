"""The gateway next to its peers, every scenario, one run: load/results/<date>.md and a PNG plot.

    .venv/bin/python load/bench.py [--seconds 5] [--repeats 3] [--only vllm-gateway,nginx]
    .venv/bin/python load/bench.py --install-peers      # vllm-router and LiteLLM, once

The fake vLLM upstream and this load client share CPU 0; each target (direct, vllm-gateway,
nginx, vllm-router, LiteLLM) gets CPU 1, one worker, and is measured alone. All targets run
side by side and take turns, scenario by scenario, ``--repeats`` times over: a machine whose
speed drifts during the run (this VM's did, by up to 2x within minutes) then biases none of
them. The report gives the median and the spread (min-max). A last run puts two gateway
processes on both cores to show how throughput scales past one core.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import run
from peers import (
    ROOT,
    Target,
    install_peers,
    start_fake,
    start_gateway,
    start_litellm,
    start_nginx,
    start_vllm_router,
)
from report import Rows

CLK_TCK = os.sysconf("SC_CLK_TCK")
FAKE_PORT, TARGET_PORT = 19301, 19310


@dataclass(frozen=True)
class Scenario:
    name: str
    concurrency: int
    body: dict[str, object]
    path: str = "/v1/chat/completions"
    others: tuple[dict[str, object], ...] = ()  # more bodies, sent in turn with ``body``


def scenarios() -> list[Scenario]:
    chat = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    slow = {**chat, "stream": True, "fake": {"chunks": 16, "gap_ms": 5}}
    return [
        Scenario("chat c=1", 1, chat),
        Scenario("chat c=16", 16, chat),
        Scenario("chat c=64", 64, chat),
        Scenario("stream 64 chunks c=16", 16, {**chat, "stream": True, "fake": {"chunks": 64}}),
        Scenario("stream 5 ms gaps c=64", 64, slow),
        Scenario("stream 5 ms gaps c=1000", 1000, slow),
        Scenario(
            "embeddings 64 KB c=16",
            16,
            {"model": "fake", "input": ["x" * 1000] * 64},
            "/v1/embeddings",
        ),
    ]


def family(pids: list[int]) -> list[int]:
    """The target's processes and their descendants (nginx and LiteLLM fork workers)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    seen: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo += children.get(pid, [])
    return seen


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in family(pids):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


def rss_mb(pids: list[int]) -> float:
    total = 0.0
    for pid in family(pids):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def measure(target: Target, scenario: Scenario, seconds: float, ports: int = 1) -> dict[str, Any]:
    bodies = [json.dumps(b).encode() for b in (scenario.body, *scenario.others)]
    body = bodies[0] if len(bodies) == 1 else bodies
    pids = target.pids
    before = cpu_seconds(pids) if target.name != "direct" else 0.0

    async def load() -> Any:
        share = max(1, scenario.concurrency // ports)
        runs = [
            run(
                f"http://127.0.0.1:{target.port + i}{scenario.path}",
                body,
                share,
                seconds,
                headers=target.headers,
            )
            for i in range(ports)
        ]
        results = await asyncio.gather(*runs)
        merged = results[0]
        for extra in results[1:]:
            merged.latencies += extra.latencies
            merged.ttfb += extra.ttfb
            merged.events += extra.events
            merged.errors += extra.errors
        return merged

    result = asyncio.run(load())
    row = result.summary()
    if target.name != "direct":
        cpu = cpu_seconds(pids) - before
        row["cpu_us_per_request"] = cpu / max(1, row["requests"]) * 1e6
        row["cpu_us_per_event"] = cpu / result.events * 1e6 if result.events else None
        row["rss_mb"] = rss_mb(pids)
    return row


def take_turns(
    targets: list[Target],
    chosen: list[Scenario],
    rounds: int,
    seconds: float,
    after_round: Callable[[Rows], None] | None = None,
) -> Rows:
    """Every target measured alone, taking turns scenario by scenario, ``rounds`` times over:
    a drift in the machine's speed then biases none of them."""
    results: Rows = {}
    for round_ in range(rounds):
        for scenario in chosen:
            for target in targets:
                row = measure(target, scenario, seconds)
                results.setdefault(target.name, {}).setdefault(scenario.name, []).append(row)
                print(
                    f"{round_ + 1}/{rounds} {target.name:>14} | {scenario.name:<24}"
                    f" | {row['rps']:8.0f} rps",
                    flush=True,
                )
        if after_round is not None:
            after_round(results)
    return results


STARTERS: dict[str, Callable[[int, str], Target | str]] = {
    "vllm-gateway": start_gateway,
    "nginx": start_nginx,
    "vllm-router": start_vllm_router,
    "LiteLLM": start_litellm,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated target names")
    parser.add_argument("--out", default=str(ROOT / "load" / "results"))
    parser.add_argument("--install-peers", action="store_true")
    args = parser.parse_args()
    if args.install_peers:
        install_peers()
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    # 1,000 streams need 2,000 sockets in the target; children inherit this limit.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    wanted = set(args.only.split(",")) if args.only else None
    # Raw rows, written after each round, so a crash loses nothing that ran.
    raw = Path(args.out) / f"{datetime.date.today().isoformat()}.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    fake = start_fake(FAKE_PORT)
    running: list[Target] = [Target("direct", FAKE_PORT)]  # the fake itself, no gateway
    results: Rows = {}
    skipped: dict[str, str] = {}
    idle: dict[str, float] = {}
    try:
        for offset, (name, starter) in enumerate(STARTERS.items()):
            if wanted and name not in wanted:
                continue
            try:
                target = starter(TARGET_PORT + 10 * offset, fake.url)
            except (TimeoutError, OSError) as exc:
                target = f"did not start ({exc!r})"
            if isinstance(target, str):
                skipped[name] = target
                continue
            running.append(target)
            idle[name] = rss_mb(target.pids)

        def save(rows: Rows) -> None:
            raw.write_text(json.dumps({"results": rows, "idle": idle, "skipped": skipped}))

        results.update(
            take_turns(running, scenarios(), args.repeats, args.seconds, after_round=save)
        )
        for target in running[1:]:
            target.stop()
        del running[1:]
        if not wanted or "vllm-gateway" in wanted:
            pair = start_gateway(TARGET_PORT, fake.url, workers=2)
            running.append(pair)
            chat64 = scenarios()[2]
            results[pair.name] = {chat64.name: [measure(pair, chat64, args.seconds, ports=2)]}
    finally:
        for target in running[1:]:
            target.stop()
        fake.stop()
    from report import write_report  # matplotlib is imported only here

    write_report(Path(args.out), results, skipped, idle, args, platform.python_version())


if __name__ == "__main__":
    main()
