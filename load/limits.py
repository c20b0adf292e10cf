"""Per-key limits across gateway processes: is a key's minute one minute for all of them?

    .venv/bin/python load/limits.py [--seconds 60] [--rpm 600] [--offered 30]
        [--concurrent 4] [--stores redis,workers,shared,local] [--out FILE]

Two gateway processes (`python -m gateway serve`, as users run them) in front of the fake vLLM
(tests/fake_vllm.py), for each way of counting:

- ``redis``: two replicas with `limits_store` naming one real redis-server (started here);
- ``workers``: one gateway with `workers: 2` and no Redis: its two workers count in the
  host's table, which their control plane made; every request opens its own connection, so
  the kernel spreads them over both workers (``SO_REUSEPORT``);
- ``shared``: two standalone processes on one host sharing the limits table by their
  environment (``gateway.limits.shared``: a memory file they inherit);
- ``local``: two processes counting alone, as before this store existed (the comparison).

Rate: a key with `requests_per_minute: --rpm` is first drained (its bucket starts full, a
minute's worth), then offered ``--offered`` requests a second for ``--seconds``, alternating
between the two gateways; the requests admitted in that window are counted (expected: --rpm a
minute, plus the one token the drain may have left; for ``workers``, one port, every request
on its own connection). Concurrency: a key with `max_concurrent:
--concurrent` is offered requests that take 0.5 s each at the fake, 20 a second through both
gateways for 15 s; the fake's own high-water mark of requests at once is the number (expected:
exactly --concurrent). Cost: what one admit and its release take, per store, in this process
(microseconds; Redis over loopback, one at a time and 64 at once).

Prints markdown and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.process import free_port  # noqa: E402
from gateway.keys import ApiKey  # noqa: E402
from gateway.limits.local import LocalLimits  # noqa: E402
from gateway.limits.redis_store import RedisLimits  # noqa: E402
from gateway.limits.settings import LimitsStoreSettings  # noqa: E402
from gateway.limits.shared import (  # noqa: E402
    SharedTable,
    attach_shared_table,
    create_shared_table,
)
from load.http_wait import wait_http  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

RATE_KEY, CONC_KEY = "sk-limits-rate", "sk-limits-concurrent"
FAKE = str(ROOT / "tests" / "fake_vllm.py")


class Processes:
    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.tables: list[SharedTable] = []
        self.dir = Path(tempfile.mkdtemp(prefix="limits-load-"))

    def fake(self) -> str:
        port = free_port()
        cmd = [sys.executable, FAKE, "--port", str(port), "--served-model-name", "fake"]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health")
        return url

    def gateways(
        self, upstream: str, args: argparse.Namespace, store: str, redis: str
    ) -> list[str]:
        keys = [
            {"name": "rate", "key": RATE_KEY, "requests_per_minute": args.rpm},
            {"name": "concurrent", "key": CONC_KEY, "max_concurrent": args.concurrent},
        ]
        config: dict[str, Any] = {
            "models": [{"name": "fake", "url": upstream}],
            "api_keys": keys,
            "log_level": "warning",
        }
        envs: list[dict[str, str]] = [{}, {}]
        fds: tuple[int, ...] = ()
        if store == "redis":
            config["limits_store"] = {"url": redis, "prefix": f"load-{os.getpid()}-{time.time()}"}
        elif store == "shared":
            table = create_shared_table(workers=2)
            self.tables.append(table)
            envs, fds = [table.env(0), table.env(1)], table.pass_fds
        elif store == "workers":
            config["workers"] = 2
            envs = [{}]
        path = self.dir / f"{store}.yaml"
        path.write_text(yaml.safe_dump(config))
        urls = []
        for env in envs:
            port = free_port()
            cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path)]
            log = open(self.dir / f"{store}-{port}.log", "wb")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen(
                    [*cmd, "--port", str(port)],
                    cwd=ROOT,
                    env={**os.environ, **env},
                    pass_fds=fds,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            wait_http(url + "/health")
        return urls

    def worker_cpu(self) -> list[float]:
        """CPU seconds of each worker (by row) of the last gateway started: the evidence
        that both relayed (empty for a gateway without workers)."""
        parent = self.procs[-1].pid
        tick = os.sysconf("SC_CLK_TCK")
        found: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and b"--row" in argv:
                row = int(argv[argv.index(b"--row") + 1])
                found[row] = (int(fields[11]) + int(fields[12])) / tick
        return [found[row] for row in sorted(found)]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)
        for table in self.tables:
            table.close()


def connections(urls: list[str]) -> httpx.Limits:
    """One gateway of several workers: a connection per request, which the kernel gives to
    either worker; else kept-alive connections."""
    kept = None if len(urls) > 1 else 0
    return httpx.Limits(max_connections=500, max_keepalive_connections=kept)


async def paced(
    urls: list[str], key: str, rate: float, seconds: float, body: dict[str, Any]
) -> Counter[int]:
    """``rate`` requests a second for ``seconds``, round robin over ``urls``, by send time."""
    statuses: Counter[int] = Counter()
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60, limits=connections(urls)) as client:

        async def one(url: str) -> None:
            answer = await client.post(f"{url}/v1/chat/completions", json=body, headers=headers)
            statuses[answer.status_code] += 1

        tasks = []
        began = time.monotonic()
        for i in range(int(rate * seconds)):
            delay = began + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(urls[i % len(urls)])))
        await asyncio.gather(*tasks)
    return statuses


async def drain(urls: list[str], key: str) -> int:
    """Spend the bucket's burst: requests until each gateway has refused one."""
    admitted = 0
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "fake", "messages": [], "fake": {"chunks": 1}}
    async with httpx.AsyncClient(timeout=60, limits=connections(urls)) as client:
        refused: set[str] = set()
        while len(refused) < len(urls):
            sent = urls * 8
            answers = await asyncio.gather(
                *(client.post(f"{u}/v1/chat/completions", json=body, headers=headers) for u in sent)
            )
            for url, answer in zip(sent, answers, strict=True):
                if answer.status_code == 200:
                    admitted += 1
                else:
                    refused.add(url)
    return admitted


def rate_phase(urls: list[str], args: argparse.Namespace) -> dict[str, Any]:
    burst = asyncio.run(drain(urls, RATE_KEY))
    body = {"model": "fake", "messages": [], "fake": {"chunks": 1}}
    statuses = asyncio.run(paced(urls, RATE_KEY, args.offered, args.seconds, body))
    return {
        "burst": burst,
        "admitted": statuses[200],
        "refused": statuses[429],
        "other": sum(n for s, n in statuses.items() if s not in (200, 429)),
    }


def concurrency_phase(urls: list[str], fake: str, args: argparse.Namespace) -> dict[str, Any]:
    body = {"model": "fake", "messages": [], "fake": {"chunks": 10, "gap_ms": 50}}
    statuses = asyncio.run(paced(urls, CONC_KEY, 20, 15, body))
    stats = httpx.get(f"{fake}/fake/stats").json()
    return {
        "max_running": stats["max_running"],
        "admitted": statuses[200],
        "refused": statuses[429],
    }


def per_call_us(calls: int, run: Callable[[], None]) -> float:
    began = time.perf_counter()
    run()
    return (time.perf_counter() - began) / calls * 1e6


def costs(redis: RedisServer, rounds: int = 5) -> dict[str, float]:
    """The median of ``rounds`` rounds of each (the machine is shared: its load drifts)."""
    found: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, us in one_round(redis).items():
            found.setdefault(name, []).append(us)
    return {name: statistics.median(values) for name, values in found.items()}


def one_round(redis: RedisServer, calls: int = 20000) -> dict[str, float]:
    key = ApiKey("cost", b"x" * 32, None, requests_per_minute=10**9, max_concurrent=10**6)
    local = LocalLimits()

    def local_loop() -> None:
        for _ in range(calls):
            local.admit(key)
            local.release(key)

    table = create_shared_table(workers=2)
    shared = attach_shared_table(table.where, 0)

    def shared_loop() -> None:
        for _ in range(calls):
            shared.admit(key)
            shared.release(key)

    found = {"local": per_call_us(calls, local_loop), "shared": per_call_us(calls, shared_loop)}
    table.close()
    found.update(asyncio.run(redis_costs(redis, key, calls // 10)))
    return found


async def redis_costs(redis: RedisServer, key: ApiKey, calls: int) -> dict[str, float]:
    store = RedisLimits(LimitsStoreSettings(url=redis.url, prefix="load-cost"))
    await store.start()

    async def one() -> None:
        if await store.ask(key):
            store.release(key)

    async def sequential() -> None:
        for _ in range(calls):
            await one()

    async def concurrent() -> None:
        for _ in range(calls // 64):
            await asyncio.gather(*(one() for _ in range(64)))

    found = {
        "redis (one at a time)": await timed(calls, sequential),
        "redis (64 at once, per admit)": await timed(calls // 64 * 64, concurrent),
    }
    await store.close()
    return found


async def timed(calls: int, run: Callable[[], Awaitable[None]]) -> float:
    began = time.perf_counter()
    await run()
    return (time.perf_counter() - began) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--offered", type=float, default=30, help="requests a second, offered")
    parser.add_argument("--concurrent", type=int, default=4)
    parser.add_argument("--stores", default="redis,workers,shared,local")
    parser.add_argument("--out", default=str(ROOT / "load" / "results" / "limits-2026-12-03.md"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # its servers stop with it
    redis = RedisServer()
    procs = Processes()
    rows = []
    try:
        for store in filter(None, args.stores.split(",")):
            fake = procs.fake()
            urls = procs.gateways(fake, args, store, redis.url)
            before = procs.worker_cpu()
            rate = rate_phase(urls, args)
            conc = concurrency_phase(urls, fake, args)
            cpu = [b - a for a, b in zip(before, procs.worker_cpu(), strict=True)]
            rate["workers"] = " / ".join(f"{seconds:.1f}" for seconds in cpu) or "-"
            rows.append((store, rate, conc))
            print(store, rate, conc, flush=True)
        cost = costs(redis)
    finally:
        procs.stop()
        redis.stop()
    expected = args.rpm * args.seconds / 60
    lines = [
        f"Command: `.venv/bin/python load/limits.py --seconds {args.seconds:g} --rpm {args.rpm} "
        f"--offered {args.offered:g} --concurrent {args.concurrent} --stores {args.stores}`",
        "",
        "Two gateway processes (`workers`: one gateway of two workers); rate: "
        f"`requests_per_minute: {args.rpm}` offered {args.offered:g}/s for {args.seconds:g} s "
        "after its burst was drained (expected "
        f"{expected:g}); concurrency: `max_concurrent: {args.concurrent}`, 0.5 s requests "
        "offered 20/s for 15 s.",
        "",
        "| store | burst drained | admitted in the window | vs expected | 429 | other | "
        "most at once at the fake | concurrency 200 / 429 | CPU s of each worker |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for store, rate, conc in rows:
        off = (rate["admitted"] - expected) / expected * 100
        lines.append(
            f"| {store} | {rate['burst']} | {rate['admitted']} | {off:+.1f} % | "
            f"{rate['refused']} | {rate['other']} | {conc['max_running']} | "
            f"{conc['admitted']} / {conc['refused']} | {rate['workers']} |"
        )
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        "",
        f"Cost: the median of 5 rounds, in one process; {os.cpu_count()} cores, load average "
        f"{load} at the end (the machine is shared).",
        "",
        "| store | one admit and its release (µs) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {us:.1f} |" for name, us in cost.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
