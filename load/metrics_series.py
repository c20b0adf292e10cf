"""How many series one /metrics scrape holds with many API keys, and how large it is.

    .venv/bin/python load/metrics_series.py [--keys 5000] [--base REV]

Every key sends the same small mix through the gateway's request counters (``GatewayMetrics``,
in-process: no server, no backend): a chat model's /v1/chat/completions, answered 200 with
token usage, every third key also refused 429 once, every fifth also calls /v1/completions, and
every seventh an embedder. The scrape is then rendered as Prometheus text and its samples
counted, by family. Run for the working tree with `metrics.requests_by_key` off (the default)
and on, and, with ``--base``, for a git revision's own code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ROOT, checkout

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from collections import Counter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from gateway.metrics import GatewayMetrics
from gateway.record import RequestRecord

keys, by_key = int(sys.argv[2]), sys.argv[3] == "on"
try:
    metrics = GatewayMetrics([], requests_by_key=by_key)
except TypeError:  # a revision before `metrics.requests_by_key`
    metrics = GatewayMetrics([])

def finish(key, model, endpoint, status, usage=None):
    record = RequestRecord("id", endpoint, key=key, model=model, status=status)
    record.usage = usage
    metrics.observe(record, 0.2)

for i in range(keys):
    key = f"team-{i:05d}"
    chat = "qwen2.5-72b-instruct" if i % 2 else "qwen2.5-7b-instruct"
    finish(key, chat, "/v1/chat/completions", 200, (120, 40))
    if i % 3 == 0:
        finish(key, chat, "/v1/chat/completions", 429)
    if i % 5 == 0:
        finish(key, chat, "/v1/completions", 200, (30, 10))
    if i % 7 == 0:
        finish(key, "bge-m3", "/v1/embeddings", 200, (64, 0))
text = generate_latest(metrics.registry).decode()
families = Counter()
for family in text_string_to_metric_families(text):
    families[family.name] += len(family.samples)
print(json.dumps({"bytes": len(text.encode()), "series": sum(families.values()),
                  "families": dict(families)}))
"""


def measure(root: Path, keys: int, by_key: bool) -> dict[str, object]:
    args = [sys.executable, "-c", _CHILD, str(root), str(keys), "on" if by_key else "off"]
    done = subprocess.run(args, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise SystemExit(f"the build in {root} failed:\n{done.stderr}")
    found: dict[str, object] = json.loads(done.stdout)
    return found


def report(rows: list[tuple[str, dict[str, object]]], keys: int) -> str:
    counted = [row["families"] for _, row in rows]
    families = sorted({f for c in counted for f, n in c.items() if n})  # type: ignore[attr-defined]
    head = "| | series | bytes a scrape | " + " | ".join(f"`{f}`" for f in families) + " |"
    lines = [f"{keys:,} keys", "", head, "|---" * (len(families) + 3) + "|"]
    for name, row in rows:
        counts = row["families"]
        cells = [str(counts.get(f, 0)) for f in families]  # type: ignore[attr-defined]
        lines.append(
            f"| {name} | {row['series']:,} | {row['bytes']:,} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=5000)
    parser.add_argument("--base", help="a git revision to measure too (its own code)")
    args = parser.parse_args()
    rows = []
    if args.base:
        with checkout(args.base) as base:
            rows.append((f"{args.base} (before)", measure(base, args.keys, by_key=False)))
    rows.append(("working tree, requests_by_key: false", measure(ROOT, args.keys, False)))
    rows.append(("working tree, requests_by_key: true", measure(ROOT, args.keys, True)))
    print(report(rows, args.keys))


if __name__ == "__main__":
    main()
