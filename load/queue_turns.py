"""What a model's queue costs a gateway of several workers: each request's turn is asked of the
control plane over its unix socket (gateway/workers/turns.py).

    .venv/bin/python load/queue_turns.py [--workers 2] [--rounds 3] [--seconds 8]
        [--concurrency 16] [--out FILE]

One gateway (`python -m gateway serve`, `workers: --workers`) in front of one fake vLLM
(tests/fake_vllm.py, answering at once), serving it as two models: `free` (no queue) and
`capped` (`queue: {max_in_flight: 100000}`, a cap never reached, so what is measured is the
turn's round trip, not waiting). The closed-loop client (load/loadgen.py, kept-alive
connections, which the kernel spreads over the workers) alternates between the two, round by
round. Prints markdown and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.process import free_port  # noqa: E402
from load.http_wait import wait_http  # noqa: E402
from load.loadgen import run  # noqa: E402

FAKE = str(ROOT / "tests" / "fake_vllm.py")


def start(workers: int, work: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    fake_port, port = free_port(), free_port()
    fake = subprocess.Popen(
        [sys.executable, FAKE, "--port", str(fake_port), "--served-model-name", "free", "capped"],
        stdout=subprocess.DEVNULL,
    )
    wait_http(f"http://127.0.0.1:{fake_port}/health")
    upstream = f"http://127.0.0.1:{fake_port}"
    config = {
        "workers": workers,
        "log_level": "warning",
        "access_log": False,
        "models": [
            {"name": "free", "url": upstream},
            {"name": "capped", "url": upstream, "queue": {"max_in_flight": 100000}},
        ],
    }
    path = work / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    log = open(work / "gateway.log", "wb")  # noqa: SIM115
    gateway = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/health")
    return [gateway, fake], url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--out", default=str(ROOT / "load" / "results" / "queue-turns-2026-12-03.md")
    )
    args = parser.parse_args()
    procs, url = start(args.workers, Path(tempfile.mkdtemp(prefix="queue-turns-")))
    found: dict[str, list[dict[str, float]]] = {"free": [], "capped": []}
    try:
        for _ in range(args.rounds):
            for model in found:
                body = b'{"model":"%s","messages":[],"fake":{"chunks":1}}' % model.encode()
                result = asyncio.run(
                    run(url + "/v1/chat/completions", body, args.concurrency, args.seconds)
                )
                found[model].append(result.summary())
                print(model, found[model][-1], flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
    rows = {
        model: {
            "rps": statistics.median(r["rps"] for r in runs),
            "p50": statistics.median(r["p50_ms"] for r in runs),
            "errors": sum(r["errors"] for r in runs),
        }
        for model, runs in found.items()
    }
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"Command: `.venv/bin/python load/queue_turns.py --workers {args.workers} --rounds "
        f"{args.rounds} --seconds {args.seconds:g} --concurrency {args.concurrency}`",
        "",
        f"One gateway of {args.workers} workers, one fake vLLM answering at once, JSON chat, "
        f"{args.concurrency} kept-alive connections, {args.rounds} interleaved rounds of "
        f"{args.seconds:g} s per model (medians); {os.cpu_count()} cores, load average {load} "
        "at the end (the machine is shared).",
        "",
        "| model | requests/s | p50 latency (ms) | errors |",
        "|---|---|---|---|",
    ]
    for model, row in rows.items():
        lines.append(f"| {model} | {row['rps']:.0f} | {row['p50']:.2f} | {row['errors']:.0f} |")
    ratio = rows["capped"]["rps"] / rows["free"]["rps"]
    added = rows["capped"]["p50"] - rows["free"]["p50"]
    lines += [
        "",
        f"`capped` ran at {ratio:.2f}x the rate of `free`, {added:+.2f} ms at the median: the "
        "cost of asking the control plane for each turn and telling it the turn is done (one "
        "round trip and one notice on its unix socket, and the control plane's own work for "
        "them). A model without `max_in_flight` asks nothing while it serves.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
