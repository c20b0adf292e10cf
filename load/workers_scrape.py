"""What summing the workers' counts costs a scrape: /metrics time at `workers` 1, 2 and 4.

    .venv/bin/python load/workers_scrape.py [--workers 1,2,4] [--keys 100] [--scrapes 30]

Each gateway serves one fake vLLM model to ``--keys`` API keys; every key sends one request
through every worker (so each worker holds a series per key), then /metrics is read
``--scrapes`` times, one after another; the median time and the body's size are reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.servers import FakeBackend, GatewayProcess
from tests.workers import one_on_each, worker_pids

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def measure(workers: int, keys: list[str], scrapes: int, backend: FakeBackend) -> dict[str, float]:
    config = {
        "workers": workers,
        "models": [{"name": "m", "url": backend.url}],
        "api_keys": [{"name": "ops", "key": "sk-ops", "admin": True}]
        + [{"name": f"k{i}", "key": key} for i, key in enumerate(keys)],
        "access_log": False,
    }
    gw = GatewayProcess(config, Path(tempfile.mkdtemp()))
    try:
        pids = worker_pids(gw)
        clients = one_on_each(gw, pids) if pids else {}
        for key in keys:
            if clients:
                for client in clients.values():
                    assert client.call("POST", "/v1/chat/completions", CHAT, key)[0] == 200
            else:
                auth = {"Authorization": f"Bearer {key}"}
                httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=auth)
        times, size = [], 0
        with httpx.Client(headers={"Authorization": "Bearer sk-ops"}) as client:
            for _ in range(scrapes):
                began = time.perf_counter()
                size = len(client.get(f"{gw.url}/metrics").content)
                times.append(time.perf_counter() - began)
        return {"ms": statistics.median(times) * 1000, "bytes": size}
    finally:
        gw.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--keys", type=int, default=100)
    parser.add_argument("--scrapes", type=int, default=30)
    args = parser.parse_args()
    keys = [f"sk-scrape-{i:04d}" for i in range(args.keys)]
    backend = FakeBackend("m")
    try:
        print("| workers | /metrics ms (median) | body KB |")
        print("|---|---|---|")
        for workers in (int(w) for w in args.workers.split(",")):
            row = measure(workers, keys, args.scrapes, backend)
            print(f"| {workers} | {row['ms']:.1f} | {row['bytes'] / 1024:.0f} |", flush=True)
    finally:
        backend.close()


if __name__ == "__main__":
    main()
