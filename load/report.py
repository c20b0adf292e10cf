"""The benchmark's report: a markdown table per scenario, the targets checked, and a PNG plot."""

from __future__ import annotations

import datetime
import os
import statistics
from pathlib import Path
from typing import Any

Rows = dict[str, dict[str, list[dict[str, Any]]]]  # target -> scenario -> one row per repeat


def med(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def spread(rows: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def write_report(
    out: Path,
    results: Rows,
    skipped: dict[str, str],
    idle: dict[str, float],
    args: Any,
    python: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    today = datetime.date.today().isoformat()
    lines = [
        f"# vllm-gateway and its peers, {today}",
        "",
        f"`load/bench.py --seconds {args.seconds:g} --repeats {args.repeats}`: the fake vLLM "
        "upstream and the load client (raw asyncio sockets, uvloop) on CPU 0, every target on "
        "CPU 1 (taskset), one worker each, measured one at a time; the targets take turns "
        "scenario by scenario, so a drift in the machine's speed biases none of them. "
        f"Python {python}, {os.cpu_count()} cores. Closed loop, {args.seconds:g} s per run after "
        f"a 1 s warm-up. rps: median (min-max) over {args.repeats} runs; latencies in ms, "
        "medians.",
        "",
    ]
    if skipped:
        lines += [f"Not run: {name}: {why}." for name, why in skipped.items()] + [""]
    scenario_names = list(next(iter(results.values())).keys())
    for scenario in scenario_names:
        lines += [
            f"## {scenario}",
            "",
            "| target | rps | p50 | p99 | TTFB p50 | CPU µs/request | CPU µs/event | RSS MB "
            "| errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for target, by_scenario in results.items():
            rows = by_scenario.get(scenario)
            if not rows:
                continue
            per_event = med(rows, "cpu_us_per_event")
            lines.append(
                f"| {target} | {spread(rows, 'rps')} | {med(rows, 'p50_ms'):.2f} "
                f"| {med(rows, 'p99_ms'):.2f} | {med(rows, 'ttfb_p50_ms'):.2f} "
                f"| {med(rows, 'cpu_us_per_request'):.0f} "
                f"| {'-' if per_event != per_event else f'{per_event:.1f}'} "
                f"| {med(rows, 'rss_mb'):.0f} | {sum(r['errors'] for r in rows)} |"
            )
        lines.append("")
    lines += ["## Targets (vllm-gateway)", "", *targets(results, idle), ""]
    if idle:
        lines += ["Idle RSS (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in idle.items()), ""]
    png = out / f"{today}.png"
    plot(results, scenario_names, png)
    lines += [f"![requests per second]({png.name})", ""]
    path = out / f"{today}.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path} and {png}")


def targets(results: Rows, idle: dict[str, float]) -> list[str]:
    gw, direct = results.get("vllm-gateway"), results.get("direct")
    if not gw or not direct:
        return ["(the gateway or the direct baseline was not run)"]

    def line(ok: bool, text: str) -> str:
        return f"- {'met' if ok else 'MISSED'}: {text}"

    out = []
    added50 = med(gw["chat c=1"], "p50_ms") - med(direct["chat c=1"], "p50_ms")
    added99 = med(gw["chat c=1"], "p99_ms") - med(direct["chat c=1"], "p99_ms")
    out.append(line(added50 <= 0.2, f"c=1 added p50 {added50:+.2f} ms (target <= 0.2)"))
    out.append(line(added99 <= 0.5, f"c=1 added p99 {added99:+.2f} ms (target <= 0.5)"))
    rps64 = med(gw["chat c=64"], "rps")
    p99 = med(gw["chat c=64"], "p99_ms")
    out.append(line(p99 <= 15, f"c=64 p99 {p99:.1f} ms (target <= 15)"))
    for peer, factor, goal in (("nginx", 0.25, "of nginx's"), ("LiteLLM", 30, "LiteLLM's")):
        if peer in results:
            ratio = rps64 / med(results[peer]["chat c=64"], "rps")
            shown = f"{ratio:.0%}" if factor < 1 else f"{ratio:.1f}x"
            out.append(line(ratio >= factor, f"c=64 rps {rps64:.0f} = {shown} {goal} RPS"))
    per_event = med(gw["stream 64 chunks c=16"], "cpu_us_per_event")
    out.append(line(per_event <= 10, f"{per_event:.1f} µs CPU per SSE event (target <= 10)"))
    ttfb = med(gw["stream 5 ms gaps c=64"], "ttfb_p50_ms") - med(
        direct["stream 5 ms gaps c=64"], "ttfb_p50_ms"
    )
    out.append(line(ttfb <= 1, f"added TTFB p50 at c=64, 5 ms gaps: {ttfb:+.2f} ms (target <= 1)"))
    thousand = gw["stream 5 ms gaps c=1000"]
    errors, rss = sum(r["errors"] for r in thousand), max(r["rss_mb"] for r in thousand)
    out.append(
        line(errors == 0 and rss <= 250, f"1,000 streams: {errors} errors, RSS {rss:.0f} MB")
    )
    if "vllm-gateway" in idle:
        out.append(line(idle["vllm-gateway"] <= 80, f"idle RSS {idle['vllm-gateway']:.0f} MB"))
    pair = results.get("vllm-gateway x2")
    if pair:
        two = med(pair["chat c=64"], "rps")
        out.append(f"- scaling: 1 process {rps64:.0f} rps, 2 processes on 2 cores {two:.0f} rps")
    return out


def plot(results: Rows, scenario_names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "vllm-gateway x2"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [med(results[name].get(s, []), "rps") for s in scenario_names]
        xs = [x + i * width for x in range(len(scenario_names))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(scenario_names))], scenario_names)
    ax.set_yscale("log")
    ax.set_ylabel("requests per second (log)")
    ax.set_title("Throughput through one core of each target (fake vLLM upstream)")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
