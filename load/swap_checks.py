"""How firm the swap replay's targets are (load/swaps.py): the fewest swaps any scheduler can
make on a trace, the targets on other seeds of the same traces, and with one key for all.

**The fewest swaps.** The p95 target keeps a trace's dominant model resident (the hot chat
model serves 86% of the skewed day's requests, the batch job 94% of its trace's): the others
take turns in the rest of the GPU, one at a time. A schedule that serves each request within
``hold`` seconds of its arrival (or its deadline, if shorter), less a swap's ``SWAP_S``, must
change the resident at least as often as ``fewest`` does: it keeps the resident until a
waiting request's latest start would pass, then brings that request's model in, with every
request waiting for it. For two models (the batch job's assistants) that is the fewest
possible (a later switch never serves fewer requests); for four (the skewed day's) it is
the count of that rule, an estimate. Its waits are what such a schedule makes its users wait.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from swap_sim import SCENARIOS, Run, Setup, replay
from swap_traces import TRACES, Row

from backends.clock import run_virtual
from backends.swaps import AUTO, Window

KEEP = {"skewed-day": "chat", "batch-job": "batch"}  # the dominant model of each trace
SWAP_S = 1.2  # seconds from a swap's start to the newcomer serving: a sleep and a level-1 wake
HOLDS = (10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
Summary = Callable[[Run], dict[str, Any]]


def fewest(rows: list[Row], hold: float) -> tuple[int, list[float]]:
    """Changes of the resident, and each request's wait, under the latest-switch rule."""
    resident, changes, waits = rows[0].model, 0, []
    pending: list[tuple[float, Row]] = []  # (latest start, request)
    for row in rows:
        while pending and (latest := min(at for at, _ in pending)) <= row.t:
            resident = next(r.model for at, r in pending if at == latest)
            changes += 1
            waits += [latest + SWAP_S - r.t for _, r in pending if r.model == resident]
            pending = [(at, r) for at, r in pending if r.model != resident]
        if row.model == resident:
            waits.append(0.0)
        else:
            allowed = min(row.deadline or hold, hold)
            pending.append((row.t + allowed - SWAP_S, row))
    return changes, waits


def bound_table(trace: str, seed: int | None, baseline_swaps: int) -> list[str]:
    rows = _rows(trace, seed)
    turns = [r for r in rows if r.model != KEEP[trace]]
    lines = [
        f"{trace}: the fewest swaps with `{KEEP[trace]}` resident, by the longest a request "
        f"is held (its deadline, if shorter); target: at most {baseline_swaps / 2:g} "
        f"(half of `lru`'s {baseline_swaps}).",
        "",
        "| held at most (s) | fewest swaps | their waits p50 / p95 (s) | target reachable |",
        "|---|---|---|---|",
    ]
    for hold in HOLDS:
        changes, waits = fewest(turns, hold)
        ok = "yes" if changes <= baseline_swaps / 2 else "no"
        lines.append(
            f"| {hold:g} | {changes} | {_pct(waits, 0.5):.1f} / {_pct(waits, 0.95):.1f} | {ok} |"
        )
    return [*lines, ""]


def other_seeds(seeds: list[int], window: Window, summary: Summary) -> list[str]:
    """Each targeted trace on other seeds, and with one key for every request: `lru` against
    the cost policy at ``window``, and the fewest swaps holding no request longer (for a
    window of seconds; `auto`'s differs swap by swap)."""
    held = "-" if window == AUTO else f"held at most {window:g} s"
    lines = [
        f"| trace | seed | keys | lru swaps / p95 | cost swaps / p95 | refused "
        f"| fewest ({held}) | swaps halved | p95 halved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for trace in KEEP:
        cases = [(seed, False) for seed in seeds] + [(None, True)]
        for seed, one_key in cases:
            rows = _rows(trace, seed)
            if one_key:
                rows = [dataclasses.replace(r, key="one") for r in rows]
            base = summary(_run(rows, trace, Setup("lru", "lru", 2, deadlines=False)))
            cost = summary(_run(rows, trace, Setup("cost", "cost", "auto", True, window)))
            turns = [r for r in rows if r.model != KEEP[trace]]
            least = "-" if window == AUTO else fewest(turns, float(window))[0]
            bs, cs = base["swaps"], cost["swaps"]
            bp, cp = base["wait"]["p95"], cost["wait"]["p95"]
            refused = f"{cost['refused_at_once']} + {cost['refused_when_deadline_passed']}"
            lines.append(
                f"| {trace} | {seed if seed is not None else 'its own'} "
                f"| {'one' if one_key else 'per user'} | {bs} / {bp} | {cs} / {cp} | {refused} "
                f"| {least} | {_yes(cs <= bs / 2)} | {_yes(cp <= bp / 2)} |"
            )
            print(f"{trace} seed {seed} one key {one_key}: lru {bs}, cost {cs}", flush=True)
    return [*lines, ""]


def _run(rows: list[Row], trace: str, setup: Setup) -> Run:
    return run_virtual(replay(rows, SCENARIOS[trace], setup))


def _rows(trace: str, seed: int | None) -> list[Row]:
    return TRACES[trace](seed) if seed is not None else TRACES[trace]()


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
