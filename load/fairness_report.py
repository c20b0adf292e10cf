"""The tables of load/fairness.py: B's latency per phase against alone, round by round, and
where B's time went at its p99 (the gateway's access log joined to the client's clock).

A B request's time, split by the gateway's access-log line for it (its request id):

    queue     `queue_wait_ms`: arrival at the queue to its slot (the turn of an A in flight)
    upstream  the gateway's `latency_ms` less the queue wait: the backend's service time, its
              own queue, and the gateway's work once the slot was taken
    outside   the client's latency less the gateway's: the load generator, the loopback
              sockets, and the server's work before and after its record's clock
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

CPU_PARTS = ("gateway", "backend", "load")


@dataclass
class Phase:
    name: str
    flood: bool
    capped: bool
    priority_a: str = "default"
    priority_b: str = "default"
    reserved: bool = False  # `queue.reserved` keeps --pair slots for B's priority
    b: list[float] = field(default_factory=list)  # B's latencies, seconds, all rounds
    rounds: list[list[float]] = field(default_factory=list)  # the same, round by round
    b_ids: dict[str, float] = field(default_factory=dict)  # request id: B's latency
    cpu: dict[str, float] = field(default_factory=dict)  # process: CPU seconds, all rounds
    backend_waiting: float = 0.0  # the most the backend's own queue held, sampled
    a_done: int = 0
    a_failed: int = 0
    b_failed: int = 0
    seconds: float = 0.0  # B's window, over which A's answers are counted too


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def summary(phases: list[Phase], flood: int, pair: int) -> str:
    alone = phases[0]
    base50, base99 = pct(alone.b, 0.5), pct(alone.b, 0.99)
    lines = [
        "| phase | A (flood) | B | B requests | B p50 ms | B p99 ms | p50 / alone | "
        "p99 / alone | A answered /s | failed (A, B) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        p50, p99 = pct(p.b, 0.5), pct(p.b, 0.99)
        a_rate = p.a_done / p.seconds if p.seconds and p.flood else 0.0
        a = f"{flood} in flight, {p.priority_a}" if p.flood else "-"
        b = f"{pair} at a time, {p.priority_b}" + (f", {pair} reserved" if p.reserved else "")
        lines.append(
            f"| {p.name} | {a} | {b} | {len(p.b)} | "
            f"{p50 * 1000:.0f} | {p99 * 1000:.0f} | {p50 / base50:.2f} | {p99 / base99:.2f} | "
            f"{a_rate:.1f} | {p.a_failed}, {p.b_failed} |"
        )
    return "\n".join(lines)


def by_round(phases: list[Phase]) -> str:
    """Each phase's ratios to the alone phase of the same round: the median and the range."""
    alone = phases[0]
    if len(alone.rounds) < 2:
        return ""
    lines = [
        "Round by round (each against the alone phase of its own round):",
        "",
        "| phase | p50 / alone, each round | median | p99 / alone, each round | median |",
        "|---|---|---|---|---|",
    ]
    for p in phases[1:]:
        r50 = [pct(b, 0.5) / pct(a, 0.5) for b, a in zip(p.rounds, alone.rounds, strict=True)]
        r99 = [pct(b, 0.99) / pct(a, 0.99) for b, a in zip(p.rounds, alone.rounds, strict=True)]
        lines.append(
            f"| {p.name} | {', '.join(f'{r:.2f}' for r in r50)} | {statistics.median(r50):.2f} "
            f"| {', '.join(f'{r:.2f}' for r in r99)} | {statistics.median(r99):.2f} |"
        )
    return "\n".join(lines)


def verdicts(phases: list[Phase]) -> str:
    alone = phases[0]
    base50, base99 = pct(alone.b, 0.5), pct(alone.b, 0.99)
    lines = []
    for p in phases:
        if p.name == "fair":
            ratio = pct(p.b, 0.5) / base50
            verdict = "within" if ratio <= 2 else "NOT within"
            lines.append(f"- fair (same priority): B's p50 is {ratio:.2f}x alone ({verdict} 2x)")
        if p.name in ("priority", "reserved"):
            ratio = pct(p.b, 0.99) / base99
            verdict = "within" if ratio <= 1.5 else "NOT within"
            lines.append(
                f"- {p.name} (A batch, B interactive): B's p99 is {ratio:.2f}x alone "
                f"({verdict} 1.5x)"
            )
    return "\n".join(lines)


def access_lines(log: Path) -> dict[str, dict[str, float]]:
    """The gateway's access-log lines (JSON) of B's requests, by request id."""
    found: dict[str, dict[str, float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        if not line.startswith("{") or '"request_id":"b' not in line:
            continue
        entry = json.loads(line)
        found[entry["request_id"]] = entry
    return found


def breakdown(phases: list[Phase], log: Path) -> str:
    """Where B's time went: the parts' medians and p99s, and their means over B's slowest
    1% (at and above its p99), which say what makes the p99."""
    entries = access_lines(log)
    lines = [
        "Where B's time went (ms; the gateway's access log joined to the client's clock):",
        "",
        "| phase | joined | queue p50 / p99 | upstream p50 / p99 | outside p50 / p99 | "
        "slowest 1%: client = queue + upstream + outside | CPU s/s: gateway, backend, load "
        "| backend's queue, most |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        parts: list[tuple[float, float, float, float]] = []
        for rid, client in p.b_ids.items():
            entry = entries.get(rid)
            if entry is None or entry.get("status") != 200:
                continue
            queue = entry.get("queue_wait_ms", 0.0) / 1000
            gateway = entry["latency_ms"] / 1000
            parts.append((client, queue, gateway - queue, client - gateway))
        if not parts:
            continue
        q, u, o = ([x[i] for x in parts] for i in (1, 2, 3))
        p99 = pct([x[0] for x in parts], 0.99)
        slow = [x for x in parts if x[0] >= p99]
        mean = [statistics.fmean(x[i] for x in slow) * 1000 for i in range(4)]
        cpu = ", ".join(
            f"{p.cpu.get(k, 0.0) / p.seconds:.2f}" for k in ("gateway", "backend", "load")
        )
        lines.append(
            f"| {p.name} | {len(parts)} | {pct(q, 0.5) * 1000:.0f} / {pct(q, 0.99) * 1000:.0f} "
            f"| {pct(u, 0.5) * 1000:.0f} / {pct(u, 0.99) * 1000:.0f} "
            f"| {pct(o, 0.5) * 1000:.1f} / {pct(o, 0.99) * 1000:.1f} "
            f"| {mean[0]:.0f} = {mean[1]:.0f} + {mean[2]:.0f} + {mean[3]:.1f} | {cpu} "
            f"| {p.backend_waiting:.0f} |"
        )
    return "\n".join(lines)
