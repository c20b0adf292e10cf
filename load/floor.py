"""The floor under the gateway's numbers: relays with no features at all, on the same core.

    .venv/bin/python load/floor.py [--seconds 4] [--repeats 3]    # load/results/floor-<date>.md

Sketches (load/sketches.py) run next to the gateway (all on CPU 1, taking turns, the fake
vLLM and the load client on CPU 0, as in load/bench.py):

- ``uvicorn + aiohttp``: the stack the gateway is built on, relaying bytes and nothing else.
  What the gateway cannot beat without changing its stack.
- ``uvicorn + raw client``: the same, with aiohttp replaced by an asyncio protocol that writes
  the request in one send and parses the response with httptools (uvicorn's parser), over
  pooled keep-alive connections. What a leaner upstream client would buy.
- ``uvicorn + pyreqwest`` / ``+ aiosonic`` / ``+ httpr``: the maintained fast clients in the
  same place (`pip install -e .[bench]`), each used as its documentation shows for a streamed
  response: the candidates to replace aiohttp with before writing a client of our own.
- ``raw server + raw client``: no uvicorn and no ASGI either: an asyncio protocol parses the
  request with httptools and hands it to the raw client; the response goes back in one write
  (head with the first bytes). What a server protocol of the gateway's own could buy at most.

The sketches skip everything a product needs (errors, timeouts, retries, keys, metrics), so
the gap between them and the gateway is what those cost, and the gap between the sketches is
what aiohttp costs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FAKE_PORT, TARGET_PORT, scenarios, take_turns
from peers import ROOT, Target, pinned, start_fake, start_gateway, wait_http
from report import Rows, med
from sketches import serve

SCENARIOS = ("chat c=1", "chat c=64", "stream 64 chunks c=16")
SKETCHES = {
    "uvicorn + aiohttp": "aiohttp",
    "uvicorn + raw client": "raw",
    "uvicorn + pyreqwest": "pyreqwest",
    "uvicorn + aiosonic": "aiosonic",
    "uvicorn + httpr": "httpr",
    "raw server + raw client": "raw-server",
}


def start_sketch(name: str, kind: str, port: int, upstream: str) -> Target:
    cmd = [sys.executable, __file__, "--serve", kind, "--upstream", upstream, "--port", str(port)]
    proc = subprocess.Popen(pinned(1, cmd), cwd=ROOT, stderr=subprocess.DEVNULL)
    target = Target(name, port, [proc])
    wait_http(f"{target.url}/v1/models")  # any answer will do, even the fake's 404
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", choices=sorted(SKETCHES.values()))
    parser.add_argument("--upstream")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.upstream, args.port)
        return
    import uvloop

    uvloop.install()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    fake = start_fake(FAKE_PORT)
    running = [Target("direct", FAKE_PORT)]
    results: Rows = {}
    try:
        for i, (name, kind) in enumerate(SKETCHES.items()):
            running.append(start_sketch(name, kind, TARGET_PORT + 10 * i, fake.url))
        running.append(start_gateway(TARGET_PORT + 10 * len(SKETCHES), fake.url))
        chosen = [s for s in scenarios() if s.name in SCENARIOS]
        results = take_turns(running, chosen, args.repeats, args.seconds)
    finally:
        for target in running[1:]:
            target.stop()
        fake.stop()
    write_report(results, args)


def write_report(results: Rows, args: Any) -> None:
    today = datetime.date.today().isoformat()
    lines = [
        f"# The floor under the gateway, {today}",
        "",
        f"`load/floor.py --seconds {args.seconds:g} --repeats {args.repeats}`: relays with no "
        "features next to the gateway, one core each, taking turns (see the script's "
        "docstring). Medians of the repeats; ms; CPU is the relay's own per request.",
        "",
        "| relay | " + " | ".join(f"{s} rps / p50 / p99 / CPU µs" for s in SCENARIOS) + " |",
        "|---|" + "---|" * len(SCENARIOS),
    ]
    for name, by_scenario in results.items():
        cells = []
        for scenario in SCENARIOS:
            rows = by_scenario[scenario]
            cpu = "-" if name == "direct" else f"{med(rows, 'cpu_us_per_request'):.0f}"
            cells.append(
                f"{med(rows, 'rps'):.0f} / {med(rows, 'p50_ms'):.2f} / "
                f"{med(rows, 'p99_ms'):.2f} / {cpu}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    direct = results["direct"]["chat c=1"]
    lines += ["", "Added p50 at c=1 over direct (ms):"]
    for name, by_scenario in results.items():
        if name != "direct":
            added = med(by_scenario["chat c=1"], "p50_ms") - med(direct, "p50_ms")
            lines.append(f"- {name}: {added:+.2f}")
    path = ROOT / "load" / "results" / f"floor-{today}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
