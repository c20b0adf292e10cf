"""load/results/gpu-<date>.md from what load/gpu_check.sh's phases saved.

python3 load/gpu_report.py RESULTS_DIR > load/results/gpu-<date>.md
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

SHARE_TOLERANCE = 0.10  # both generative models within 10% of each other and of alone
TARGET_THROUGHPUT = 0.95  # gateway / direct, median of the rounds


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def text(path: Path) -> str:
    return path.read_text().strip() if path.exists() else "(missing)"


def kv_row(label: str, name: str, replica: dict[str, Any]) -> str:
    kv = replica.get("kv_cache") or {}

    def num(key: str, fmt: str) -> str:
        return "-" if kv.get(key) is None else format(kv[key], fmt)

    return (
        f"| {label} | {name} | {num('expected_gib', '.1f')} | {num('actual_gib', '.1f')} | "
        f"{num('expected_tokens', ',')} | {num('actual_tokens', ',')} |"
    )


def shares(out: Path) -> tuple[list[str], list[str]]:
    alone, shared = load(out / "kv-alone.json"), load(out / "kv-shared.json")
    lines = [
        "## KV cache: alone vs. sharing GPU 0 (expected from the slice, actual from vLLM)",
        "",
        "| layout | model | expected GiB | actual GiB | expected tokens | actual tokens |",
        "|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    if alone is None or shared is None:
        return [*lines, "(phase shares did not finish)", ""], ["- shares: NOT RUN"]
    for label, doc in (("alone", alone), ("shared", shared)):
        for name, replicas in doc["models"].items():
            lines += [kv_row(label, name, r) for r in replicas]
    lines += ["", "nvidia-smi with the shared layout ready:", "", "```"]
    lines += [f"{p['pid']} {p['name']} {p['mib']:.0f} MiB" for p in shared["nvidia_smi"]]
    lines += ["```", ""]

    def tokens(doc: dict[str, Any], name: str) -> int:
        return int(doc["models"][name][0]["kv_cache"]["actual_tokens"])

    base = tokens(alone, "chat-a")
    a, b = tokens(shared, "chat-a"), tokens(shared, "chat-b")
    spread = abs(a - b) / max(a, b)
    worst = max(abs(a - base), abs(b - base)) / base
    ok = spread <= SHARE_TOLERANCE and worst <= SHARE_TOLERANCE
    verdicts.append(
        f"- shares: chat-a {a:,} and chat-b {b:,} tokens, {spread:.1%} apart; alone {base:,}, "
        f"the farthest {worst:.1%} from it (target <= {SHARE_TOLERANCE:.0%}): "
        + ("met" if ok else "MISSED")
    )
    return lines, verdicts


def crash(out: Path) -> tuple[list[str], list[str]]:
    doc = load(out / "crash.json")
    lines = ["## kill -9 of chat-a's helper and API server (what `pkill -9 -f chat-a` hits)", ""]
    if doc is None:
        return [*lines, "(phase crash did not run)", ""], ["- crash: NOT RUN"]
    before = doc["before"]["models"]["chat-a"][0]["kv_cache"]["actual_tokens"]
    after = doc["after"]["models"]["chat-a"][0]["kv_cache"]["actual_tokens"]
    served = doc["chat-b_statuses_meanwhile"]
    lines += [
        f"- tree before: {doc['tree_before']} (killed {doc['killed']})",
        f"- whole tree gone after {doc['tree_gone_after_s']} s; its GPU memory free after "
        f"{doc['gpu_memory_free_after_s']} s; chat-a ready again after {doc['back_after_s']} s",
        f"- chat-b meanwhile: {served}; chat-a's first completion after: "
        f"{doc['first_completion_after']}",
        f"- chat-a KV cache: {before:,} tokens before, {after:,} after",
        "",
        "Gateway log lines:",
        "",
        "```",
        text(out / "crash-gateway-lines.txt"),
        "```",
        "",
    ]
    ok = (
        doc["back_after_s"] is not None
        and set(served) == {"200"}
        and abs(after - before) <= SHARE_TOLERANCE * before
    )
    verdict = "met" if ok else "MISSED"
    return lines, [
        f"- crash: back with {after / before:.1%} of its share, chat-b {served}: {verdict}"
    ]


def bench(out: Path) -> tuple[list[str], list[str]]:
    doc = load(out / "bench.json")
    lines = ["## vLLM's benchmark client on chat-b (random 128 in / 128 out, streaming)", ""]
    if doc is None:
        return [*lines, "(phase bench did not run)", ""], ["- bench: NOT RUN"]
    lines += [
        "Direct and through the gateway take turns, the first of each round alternating; "
        "medians of the rounds, with the range.",
        "",
        "| concurrency | path | rounds | output tok/s (median) | range | TTFT p50 ms (median) |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = []
    for row in doc["summary"]:
        for path in ("direct", "gateway"):
            r = row[path]
            low, high = r["output_tok_s_range"]
            lines.append(
                f"| {row['concurrency']} | {path} | {r['rounds']} | "
                f"{r['output_tok_s_median']:.0f} | {low:.0f}-{high:.0f} | "
                f"{r['ttft_p50_ms_median']:.2f} |"
            )
        added = row["gateway"]["ttft_p50_ms_median"] - row["direct"]["ttft_p50_ms_median"]
        verdicts.append(
            f"- bench c={row['concurrency']}: gateway/direct {row['ratio']:.3f} "
            f"(target >= {TARGET_THROUGHPUT}), added TTFT p50 {added:+.2f} ms: "
            + ("met" if row["ratio"] >= TARGET_THROUGHPUT else "MISSED")
        )
    lines += ["", "Every round:", "", "```"]
    lines += [json.dumps(run) for run in doc["runs"]]
    return [*lines, "```", ""], verdicts


def report(out: Path) -> str:
    lines = [
        f"# GPU check, {time.strftime('%Y-%m-%d')}",
        "",
        "Command: `load/gpu_check.sh PHASE` for install, shares, crash, bench, report (this file"
        " is the last phase's output).",
        "",
        f"- GPU: {text(out / 'gpu.txt')}",
        f"- model: {text(out / 'model.txt')}",
        "",
        "`vllm-gateway plan` for chat-a alone:",
        "",
        "```",
        text(out / "plan.txt"),
        "```",
        "",
        "The gateway's lines while it started the shared layout (turns and share checks):",
        "",
        "```",
        text(out / "shared-gateway-lines.txt"),
        "```",
        "",
    ]
    verdicts: list[str] = []
    for part in (shares, crash, bench):
        more, said = part(out)
        lines += more
        verdicts += said
    return "\n".join([*lines, "## Verdicts", "", *verdicts, ""])


if __name__ == "__main__":
    print(report(Path(sys.argv[1])))
