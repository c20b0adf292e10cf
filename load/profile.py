"""Where the gateway's CPU goes, per request: py-spy samples the gateway (on CPU 1, as in
load/bench.py) while the load client drives one scenario; self time is summed by the layer its
code belongs to and turned into microseconds per request with the CPU time measured meanwhile.

    .venv/bin/python load/profile.py [--scenario "chat c=64"] [--seconds 8]
                                     # load/results/profile-<date>.md (needs py-spy: .[bench])

The sampler slows what it samples a little, so the shares matter more than the sum; the
µs/request column divides the run's measured CPU per request by those shares.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FAKE_PORT, TARGET_PORT, measure, scenarios
from peers import ROOT, start_fake, start_gateway

# (layer, what a frame's "(file:line)" starts with), first match wins; py-spy names files
# relative to their sys.path entry.
LAYERS = [
    ("HTTP client (gateway/h1)", ("(gateway/h1/",)),
    (
        "access log, metrics, telemetry",
        ("(gateway/access_log.py", "(gateway/metrics.py", "(gateway/telemetry.py"),
    ),
    (
        "server side: uvicorn, httptools, gateway/server.py and coalescing.py",
        ("(uvicorn/", "(gateway/server.py", "(gateway/coalescing.py"),
    ),
    ("relay, keys, routing (rest of gateway/)", ("(gateway/",)),
    ("backends/ (pool, balancing)", ("(backends/",)),
    ("prometheus_client", ("(prometheus_client/",)),
    ("logging", ("(logging/",)),
    ("asyncio event loop", ("(asyncio/",)),
]


def layer(frame: str) -> str:
    for name, markers in LAYERS:
        if any(marker in frame for marker in markers):
            return name
    return "other"


def self_time(raw: Path) -> tuple[collections.Counter[str], collections.Counter[str]]:
    """Samples by layer and by function. py-spy's raw format: one collapsed stack a line, its
    sample count last."""
    layers: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            frame = stack.rsplit(";", 1)[-1]
            layers[layer(frame)] += int(count)
            functions[frame.rsplit(":", 1)[0] + ")"] += int(count)
    return layers, functions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", default="chat c=64")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--out", default=str(ROOT / "load" / "results"))
    args = parser.parse_args()
    chosen = next(s for s in scenarios() if s.name == args.scenario)
    raw = Path(tempfile.mkdtemp()) / "gateway.txt"
    fake = start_fake(FAKE_PORT)
    gateway = start_gateway(TARGET_PORT, fake.url)
    try:
        measure(gateway, chosen, 2)  # warm-up
        spy = [
            str(Path(sys.executable).parent / "py-spy"),
            "record", "--pid", str(gateway.pids[0]), "--rate", "500", "--format", "raw",
            "--output", str(raw), "--duration", str(int(args.seconds)), "--nonblocking",
        ]  # fmt: skip
        sampler = threading.Thread(target=subprocess.run, args=(spy,), kwargs={"check": True})
        sampler.start()
        result = measure(gateway, chosen, args.seconds)
        sampler.join()
    finally:
        gateway.stop()
        fake.stop()
    samples, functions = self_time(raw)
    total = sum(samples.values())
    per_request = result["cpu_us_per_request"]
    today = datetime.date.today().isoformat()
    lines = [
        f"# Where the gateway's CPU goes: {args.scenario}, {today}",
        "",
        f"`load/profile.py --scenario '{args.scenario}' --seconds {args.seconds:g}`: "
        f"{result['rps']:.0f} rps, {per_request:.0f} µs of gateway CPU per request, "
        f"{total} samples (py-spy, self time by layer).",
        "",
        "| layer | share | µs/request |",
        "|---|---|---|",
    ]
    for name, count in samples.most_common():
        share = count / total
        lines.append(f"| {name} | {share:.1%} | {share * per_request:.0f} |")
    lines += [
        "",
        "The 15 functions with the most self time:",
        "",
        "| function | share |",
        "|---|---|",
    ]
    for name, count in functions.most_common(15):
        lines.append(f"| `{name}` | {count / total:.1%} |")
    out = Path(args.out) / f"profile-{today}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
