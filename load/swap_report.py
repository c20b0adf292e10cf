"""The swap replay's figures: per run, per trace against its baseline, and the SVG plot."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from swap_sim import Run

from backends.swaps import DEFAULT_BATCH_WINDOW

TARGETED = ("skewed-day", "batch-job")  # the targets hold on these two traces
THRASHER = "thrasher"  # the key that alternates in the adversarial trace


def pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(run: Run) -> dict[str, Any]:
    outcomes = run.outcomes
    results = Counter(o.result for o in outcomes)
    served = [o for o in outcomes if o.result == "served"]
    waits = [o.wait for o in served]
    with_deadline = [o for o in outcomes if o.row.deadline]
    on_time = [o for o in with_deadline if o.result == "served" and o.wait <= o.row.deadline]
    late = [o for o in with_deadline if o.result == "served" and o.wait > o.row.deadline]
    by_priority: dict[str, Any] = {}
    for priority in sorted({o.row.priority for o in outcomes}):
        mine = [o.wait for o in served if o.row.priority == priority]
        by_priority[str(priority)] = _quantiles(mine) | {"requests": len(mine)}
    by_model = {
        model: _quantiles([o.wait for o in served if o.row.model == model])
        for model in sorted({o.row.model for o in outcomes})
    }
    others = [o.wait for o in served if o.row.key != THRASHER]
    mine = [o.wait for o in served if o.row.key == THRASHER]
    estimated = [(o.estimate, o.wait) for o in served if o.estimate is not None and o.wait > 0]
    swapping = sum(run.swapping.values())
    return {
        "setup": run.setup.label,
        "policy": run.setup.policy,
        "window": run.setup.window,
        "requests": len(outcomes),
        "served": results["served"],
        "refused_at_once": results["refused"],
        "refused_when_deadline_passed": results["expired"],
        "start_failed": results["failed"],
        "lost": results["lost"] + results["full"],
        "with_deadline": len(with_deadline),
        "within_deadline": len(on_time),
        "served_late": len(late),
        "swaps": run.swaps,
        "swapping_s": round(swapping, 1),
        "swapping_share": round(swapping / run.span, 4) if run.span else None,
        "cold_starts": run.loads,
        "wakes": run.wakes,
        "failed_sleeps": run.failed_sleeps,
        "wait": _quantiles(waits),
        "by_priority": by_priority,
        "by_model": by_model,
        "swapped_out": {name: counts["out"] for name, counts in run.per_model.items()},
        "others_than_the_thrasher": _quantiles(others) if mine else None,
        "the_thrasher": _quantiles(mine) if mine else None,
        "estimate_error_p50_s": round(pct([abs(e - w) for e, w in estimated], 0.5), 2)
        if estimated
        else None,
    }


def _quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}": round(pct(values, q / 100), 2) for q in (50, 95, 99)}


def line(run: Run) -> str:
    s = summary(run)
    w = s["wait"]
    return (
        f"swaps {s['swaps']}, waits p50/p95/p99 {w['p50']}/{w['p95']}/{w['p99']} s, "
        f"late {s['served_late']}, refused {s['refused_at_once']}+"
        f"{s['refused_when_deadline_passed']}, lost {s['lost']}"
    )


def write(
    out: Path,
    stem: str,
    runs: dict[str, list[Run]],
    baseline: str,
    command: str,
    extra: Sequence[str] = (),
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    summaries = {trace: [summary(r) for r in found] for trace, found in runs.items()}
    (out / f"{stem}.json").write_text(json.dumps(summaries, indent=1))
    (out / f"{stem}.svg").write_text(svg(summaries))
    lines = [
        f"# Swap scheduler replay ({stem.removeprefix('swaps-')})",
        "",
        f"Command: `.venv/bin/python {command}` (virtual time; raw figures in `{stem}.json`).",
        "",
        "Each trace replayed against the gateway's own scheduler (`backends/swaps.py`, "
        "`backends/on_demand.py`, `backends/swap_policy.py`) on a virtual-time event loop, "
        "with fake vLLM servers that take the H200's measured costs (`load/swap_sim.py`). "
        "Waits are what `OnDemandModel.ready()` returned (0 for a model already serving), "
        "over the requests served; a refusal is a 503 with the estimate (cost runs send "
        "each request's deadline; the LRU runs do not, as today's gateway ignores it).",
        "",
    ]
    for trace, found in summaries.items():
        lines += _table(trace, found)
    lines += ["## Targets", ""]
    for trace in TARGETED:
        if trace in summaries:
            lines += _targets(trace, summaries[trace], baseline)
    lines += [*extra, "", f"![p95 wait and swaps per setup]({stem}.svg)", ""]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {out / stem}.md, .json, .svg")


def _table(trace: str, found: list[dict[str, Any]]) -> list[str]:
    head = (
        "| setup | swaps | swapping (s, share) | wait p50 / p95 / p99 (s) | by priority p95 "
        "| within deadline | late | refused (at once + passed) | lost |"
    )
    lines = [f"## {trace}", "", head, "|" + "---|" * 9]
    for s in found:
        w = s["wait"]
        prio = ", ".join(f"{p}: {q['p95']}" for p, q in s["by_priority"].items())
        share = f"{s['swapping_share']:.1%}" if s["swapping_share"] is not None else "-"
        lines.append(
            f"| {s['setup']} | {s['swaps']} | {s['swapping_s']:.0f} ({share}) "
            f"| {w['p50']} / {w['p95']} / {w['p99']} | {prio} "
            f"| {s['within_deadline']} of {s['with_deadline']} | {s['served_late']} "
            f"| {s['refused_at_once']} + {s['refused_when_deadline_passed']} | {s['lost']} |"
        )
    lines.append("")
    base, chosen = found[0], _default(found)
    if chosen is not None:
        lines.append(
            f"By model, `{base['setup']}` against `{chosen['setup']}` (p50 / p95 / p99, s):"
        )
        lines.append("")
        lines.append(f"| model | {base['setup']} | {chosen['setup']} | swapped out |")
        lines.append("|---|---|---|---|")
        for model, q in base["by_model"].items():
            c = chosen["by_model"][model]
            out = f"{base['swapped_out'].get(model, '-')} / {chosen['swapped_out'].get(model, '-')}"
            lines.append(
                f"| {model} | {q['p50']} / {q['p95']} / {q['p99']} "
                f"| {c['p50']} / {c['p95']} / {c['p99']} | {out} |"
            )
    if found[0].get("the_thrasher"):
        lines.append("")
        lines.append("| setup | others' wait p50 / p95 / p99 (s) | the thrasher's |")
        lines.append("|---|---|---|")
        for s in found:
            o, t = s["others_than_the_thrasher"], s["the_thrasher"]
            lines.append(
                f"| {s['setup']} | {o['p50']} / {o['p95']} / {o['p99']} "
                f"| {t['p50']} / {t['p95']} / {t['p99']} |"
            )
    lines.append("")
    return lines


def _default(found: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The cost policy's run at the default batch window (else its first)."""
    costs = [s for s in found if s["policy"] == "cost"]
    default = [s for s in costs if s["window"] == DEFAULT_BATCH_WINDOW]
    return (default or costs or [None])[0]


def _targets(trace: str, found: list[dict[str, Any]], baseline: str) -> list[str]:
    """The cost policy at the default batch window against the baseline."""
    base = next(s for s in found if s["setup"] == baseline)
    chosen = _default(found)
    if chosen is None:
        return []

    def mark(ok: bool) -> str:
        return "met" if ok else "MISSED"

    p95, b95 = chosen["wait"]["p95"], base["wait"]["p95"]
    lines = [f"{trace}, `{chosen['setup']}` against `{baseline}`:", ""]
    lines.append(f"- {mark(p95 <= b95 / 2)}: p95 wait {p95} s against {b95} s (at most half)")
    swaps, bswaps = chosen["swaps"], base["swaps"]
    lines.append(f"- {mark(swaps <= bswaps / 2)}: swaps {swaps} against {bswaps} (at most half)")
    lines.append(f"- {mark(chosen['lost'] == 0)}: {chosen['lost']} requests lost")
    late = chosen["served_late"]
    lines.append(
        f"- {mark(late == 0)}: {late} served past their deadline (baseline: {base['served_late']})"
    )
    lines.append("")
    return lines


def svg(summaries: dict[str, list[dict[str, Any]]]) -> str:
    """Two bars per setup and trace: p95 wait and swaps, each relative to the trace's first
    (the baseline), labelled with its value."""
    bar, gap, height, top = 14, 40, 220, 30
    width = 60 + sum(len(found) * 2 * bar + gap for found in summaries.values())
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 190}" '
        'font-family="sans-serif" font-size="10">',
        '<text x="10" y="16" font-size="12">p95 wait (blue; for alternation, the other '
        "users') and swaps (orange), relative to each trace's baseline (lru)</text>",
    ]
    x = 50
    for trace, found in summaries.items():

        def p95(s: dict[str, Any]) -> float:
            waits = s["others_than_the_thrasher"] or s["wait"]
            return float(waits["p95"])

        base_wait = p95(found[0]) or 1e-9
        base_swaps = found[0]["swaps"] or 1e-9
        start = x
        for s in found:
            for value, base, colour in (
                (p95(s), base_wait, "#3b6fb6"),
                (s["swaps"], base_swaps, "#e08a2c"),
            ):
                ratio = min(2.0, value / base) if base else 0.0
                h = ratio / 2.0 * height
                parts.append(
                    f'<rect x="{x}" y="{top + height - h:.1f}" width="{bar - 2}" '
                    f'height="{h:.1f}" fill="{colour}"><title>{s["setup"]}: {value}</title>'
                    "</rect>"
                )
                x += bar
            parts.append(
                f'<text transform="translate({x - bar},{top + height + 8}) rotate(60)">'
                f"{s['setup']}</text>"
            )
        parts.append(f'<text x="{start}" y="{top + height + 150}" font-size="12">{trace}</text>')
        x += gap
    mid = top + height / 2
    parts.append(
        f'<line x1="40" x2="{width}" y1="{mid}" y2="{mid}" stroke="#999" stroke-dasharray="4"/>'
    )
    parts.append(f'<text x="4" y="{mid + 3}">1x</text><text x="4" y="{top + 3}">2x</text>')
    parts.append("</svg>")
    return "\n".join(parts)
