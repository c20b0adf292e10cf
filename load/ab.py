"""Two builds of the gateway side by side: the working tree against a git revision.

    .venv/bin/python load/ab.py [--base HEAD] [--scenarios "chat c=1,chat c=64"] [--rounds 4]

This machine's speed drifts (by up to 2x within minutes), so two builds measured one after the
other compare nothing. Here both run at once, each on CPU 1 (the fake vLLM and the load client
on CPU 0, as in load/bench.py), and take turns scenario by scenario; the medians over the
rounds are compared. The base is checked out into a temporary git worktree.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FAKE_PORT, TARGET_PORT, scenarios, take_turns
from peers import Target, checkout, start_fake, start_gateway
from report import Rows, med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against")
    parser.add_argument("--scenarios", default="chat c=1,chat c=64")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    chosen = [s for s in scenarios() if s.name in args.scenarios.split(",")]
    builds: list[Target] = []
    results: Rows = {}
    with checkout(args.base) as base_dir:
        fake = start_fake(FAKE_PORT)
        try:
            builds.append(start_gateway(TARGET_PORT, fake.url, root=base_dir))
            builds.append(start_gateway(TARGET_PORT + 1, fake.url))
            builds[0].name, builds[1].name = args.base, "working tree"
            results = take_turns(builds, chosen, args.rounds, args.seconds)
        finally:
            for build in builds:
                build.stop()
            fake.stop()
    print("| scenario | build | rps | p50 ms | p99 ms | TTFB p50 ms | CPU µs/request |")
    print("|---|---|---|---|---|---|---|")
    for scenario in chosen:
        for name in (args.base, "working tree"):
            runs = results[name][scenario.name]
            print(
                f"| {scenario.name} | {name} | {med(runs, 'rps'):.0f} "
                f"| {med(runs, 'p50_ms'):.2f} | {med(runs, 'p99_ms'):.2f} "
                f"| {med(runs, 'ttfb_p50_ms'):.2f} | {med(runs, 'cpu_us_per_request'):.0f} |"
            )


if __name__ == "__main__":
    main()
