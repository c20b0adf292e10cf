"""Replay traffic against the swap scheduler: the cost policy next to LRU, same trace, same run.

    .venv/bin/python load/swaps.py                          # the three traces, virtual time
    .venv/bin/python load/swaps.py --trace skewed-day --windows auto,0,15,30,60,120
    .venv/bin/python load/swaps.py --seeds 11,12,13,14     # also other seeds, and one key
    .venv/bin/python load/swaps.py --write-traces DIR       # the traces as JSON lines
    .venv/bin/python load/swaps.py --url http://gw:8000 --api-key sk-... --trace-file T.jsonl

By default each trace (load/swap_traces.py) is replayed in virtual time against the gateway's
own scheduler code and fake servers that take the H200's measured costs (load/swap_sim.py),
once per setup: `lru` (the first policy, `sleep_level: 2`, as the H200 swap runs used; and at
levels 1 and auto), and `cost` at each batch window, which also sends each request's deadline
(`x-vllm-gateway-max-wait`: today's gateway ignores it, so the LRU runs show who was served
late). It writes load/results/swaps-<date>.md, .json and .svg, with how firm the targets are
(load/swap_checks.py): the fewest swaps any scheduler can make on the targeted traces, and
with ``--seeds`` the targets on other seeds of them and with one key for every request.

With ``--url`` it replays one trace in real time (``--speed`` times faster) against a running
gateway instead, each request a chat completion of about the trace's prompt and output length,
and reports the same figures from what the gateway answered (its start-wait header, its 503s)
and, with a key that may read /metrics, its swap counters.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import swap_checks
import swap_report
from swap_sim import SCENARIOS, Outcome, Run, Setup, replay
from swap_traces import TRACES, Row, read, write

from backends.clock import run_virtual
from backends.swaps import AUTO, DEFAULT_BATCH_WINDOW, Window

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "lru"


def setups(windows: Iterable[Window]) -> list[Setup]:
    runs = [
        Setup(BASELINE, "lru", 2, deadlines=False),
        Setup("lru, level 1", "lru", 1, deadlines=False),
        Setup("lru, level auto", "lru", "auto", deadlines=False),
    ]
    runs += [Setup(f"cost, window {_label(w)}", "cost", "auto", True, w) for w in windows]
    return runs


def virtual(traces: list[str], windows: list[Window], seed: int | None) -> dict[str, list[Run]]:
    found: dict[str, list[Run]] = {}
    for name in traces:
        rows = _trace(name, seed)
        found[name] = []
        for setup in setups(windows):
            began = time.perf_counter()
            run = run_virtual(replay(rows, SCENARIOS[name], setup))
            took = time.perf_counter() - began
            print(f"{name}: {setup.label}: {swap_report.line(run)} ({took:.1f}s)", flush=True)
            found[name].append(run)
    return found


async def against(url: str, key: str, rows: list[Row], speed: float, limit: int) -> Run:
    """The trace in real time against a gateway: each row a chat completion."""
    import httpx

    rows = rows[:limit] if limit else rows
    outcomes = [Outcome(row) for row in rows]
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=None) as client:
        swaps_before = await _swaps(client)
        began = time.monotonic()
        tasks = []
        for outcome in outcomes:
            delay = began + outcome.row.t / speed - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_ask(client, outcome)))
        await asyncio.gather(*tasks)
        span = time.monotonic() - began
        swaps = await _swaps(client)
    setup = Setup(f"gateway at {url}", "cost", "auto", True)
    counted = -1 if swaps is None or swaps_before is None else int(swaps - swaps_before)
    return Run(setup, outcomes, counted, {}, 0, 0, 0, span)


async def _ask(client: Any, outcome: Outcome) -> None:
    row = outcome.row
    body = {
        "model": row.model,
        "messages": [{"role": "user", "content": "hi " * min(row.prompt, 4000)}],
        "max_tokens": row.output,
    }
    headers = {"x-vllm-gateway-max-wait": f"{row.deadline:g}"} if row.deadline else {}
    sent = time.monotonic()
    try:
        answer = await client.post("/v1/chat/completions", json=body, headers=headers)
    except Exception:  # a load tool: any failure to get an answer is a lost request
        outcome.result = "lost"
        return
    if answer.status_code == 200:
        outcome.result = "served"
        outcome.wait = float(answer.headers.get("x-vllm-gateway-start-wait", 0.0))
        return
    code = answer.json().get("error", {}).get("code") if answer.content else None
    outcome.wait = time.monotonic() - sent
    outcome.result = {"max_wait_exceeded": "refused", "model_not_started": "failed"}.get(
        str(code), "lost"
    )


async def _swaps(client: Any) -> float | None:
    """vllm_gateway_model_swapped_out_total over every model, if the key may read /metrics."""
    answer = await client.get("/metrics")
    if answer.status_code != 200:
        return None
    prefix = "vllm_gateway_model_swapped_out_total{"
    return sum(float(x.rsplit(" ", 1)[1]) for x in answer.text.splitlines() if x.startswith(prefix))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default="all", help=f"all, or one of {', '.join(TRACES)}")
    parser.add_argument(
        "--windows", default="auto,0,15,30,60,90,120", help="cost: batch windows (s, or auto)"
    )
    parser.add_argument(
        "--seeds", default="", help="also the targets on these seeds of the traces, and one key"
    )
    parser.add_argument("--seed", type=int, default=None, help="the traces' seed (default: each's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--write-traces", type=Path, help="write the traces here, and stop")
    parser.add_argument("--url", help="replay against this gateway, in real time")
    parser.add_argument("--api-key", default="", help="with --url: the key to send")
    parser.add_argument("--trace-file", type=Path, help="with --url: a trace file to replay")
    parser.add_argument("--speed", type=float, default=1.0, help="with --url: times faster")
    parser.add_argument("--limit", type=int, default=0, help="with --url: the first N rows")
    args = parser.parse_args()
    names = list(TRACES) if args.trace == "all" else [args.trace]
    if args.write_traces is not None:
        args.write_traces.mkdir(parents=True, exist_ok=True)
        for name in names:
            write(_trace(name, args.seed), args.write_traces / f"{name}.jsonl")
        return 0
    if args.url:
        rows = read(args.trace_file) if args.trace_file else _trace(names[0], args.seed)
        run = asyncio.run(against(args.url, args.api_key, rows, args.speed, args.limit))
        print(json.dumps(swap_report.summary(run), indent=1))
        return 0
    windows: list[Window] = [AUTO if w == AUTO else float(w) for w in args.windows.split(",") if w]
    runs = virtual(names, windows, args.seed)
    today = datetime.date.today().isoformat()
    command = "load/swaps.py " + " ".join(sys.argv[1:])
    checks = firmness(runs, args.seed, [int(s) for s in args.seeds.split(",") if s])
    swap_report.write(args.out, f"swaps-{today}", runs, BASELINE, command.strip(), checks)
    return 0


def firmness(runs: dict[str, list[Run]], seed: int | None, seeds: list[int]) -> list[str]:
    """The fewest swaps possible on each targeted trace, then the targets on other seeds."""
    lines = ["## How firm the targets are", "", *swap_checks.__doc__.split("\n\n")[1:2], ""]
    for trace in swap_checks.KEEP:
        if trace in runs:
            baseline = next(r for r in runs[trace] if r.setup.label == BASELINE)
            lines += swap_checks.bound_table(trace, seed, baseline.swaps)
    if seeds:
        lines += [
            f"The targeted traces on other seeds (`--seed`), and on their own seed with one key "
            f"for every request, `lru` against `cost` at the default window "
            f"({_label(DEFAULT_BATCH_WINDOW)}):",
            "",
            *swap_checks.other_seeds(seeds, DEFAULT_BATCH_WINDOW, swap_report.summary),
        ]
    return lines


def _label(window: Window) -> str:
    return window if window == AUTO else f"{window:g}s"


def _trace(name: str, seed: int | None) -> list[Row]:
    return TRACES[name](seed) if seed is not None else TRACES[name]()


if __name__ == "__main__":
    raise SystemExit(main())
