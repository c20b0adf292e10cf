"""What tracing costs a request: four gateways side by side against the fake vLLM.

    .venv/bin/python load/tracing_cost.py [--base main] [--scenarios "chat c=1,chat c=64"]
        [--rounds 4] [--seconds 3]

The targets: the base revision (no tracing), this tree without `tracing` (must match the base:
off costs nothing), this tree with `tracing.sample_ratio: 0` (spans not recorded, a
traceparent still sent) and with `sample_ratio: 1` (every span recorded and exported). As in
load/ab.py they all run at once, each gateway on CPU 1 (the fake, the load client and a sink
that answers the exports on CPU 0), and take turns scenario by scenario; the medians over the
rounds are compared. The sink answers OTLP/HTTP with 200 without decoding: the cost measured is
the gateway's (its spans, and its export thread's protobuf encoding and HTTP posts), not a
collector's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Scenario, scenarios, take_turns
from peers import ROOT, Target, checkout, pinned, start_fake, start_gateway, wait_http
from report import Rows, med

# Ports of their own: load/bench.py and load/ab.py (19301, 19310...) may run beside this.
FAKE_PORT, TARGET_PORT, SINK_PORT = 19401, 19410, 19450
SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def start_sink(port: int) -> Target:
    proc = subprocess.Popen(pinned(0, [sys.executable, "-c", SINK, str(port)]))
    sink = Target("sink", port, [proc])
    wait_http(sink.url + "/")
    return sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="main", help="the git revision without tracing")
    parser.add_argument("--scenarios", default="chat c=1,chat c=64")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args()
    import uvloop

    uvloop.install()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    chosen = [s for s in scenarios() if s.name in args.scenarios.split(",")]
    with checkout(args.base) as base_dir:
        variants, results = _run(args, base_dir, chosen)
    print("| scenario | build | rps | p50 ms | p99 ms | CPU µs/request |")
    print("|---|---|---|---|---|---|")
    for scenario in chosen:
        for name in variants:
            runs = results[name][scenario.name]
            print(
                f"| {scenario.name} | {name} | {med(runs, 'rps'):.0f} "
                f"| {med(runs, 'p50_ms'):.2f} | {med(runs, 'p99_ms'):.2f} "
                f"| {med(runs, 'cpu_us_per_request'):.0f} |"
            )


def _run(
    args: argparse.Namespace, base_dir: Path, chosen: list[Scenario]
) -> tuple[list[str], Rows]:
    """The four gateways side by side, rounds interleaved; the names in order, the rows."""
    fake, sink = start_fake(FAKE_PORT), start_sink(SINK_PORT)
    endpoint = f"{sink.url}/v1/traces"
    variants: list[tuple[str, Path, dict[str, object] | None]] = [
        (f"{args.base}", base_dir, None),
        ("tracing absent", ROOT, None),
        ("sample_ratio 0", ROOT, {"tracing": {"otlp_endpoint": endpoint, "sample_ratio": 0}}),
        ("sample_ratio 1", ROOT, {"tracing": {"otlp_endpoint": endpoint, "sample_ratio": 1}}),
    ]
    builds: list[Target] = []
    try:
        for i, (name, root, extra) in enumerate(variants):
            build = start_gateway(TARGET_PORT + i, fake.url, root=root, extra=extra)
            build.name = name
            builds.append(build)
        return [v[0] for v in variants], take_turns(builds, chosen, args.rounds, args.seconds)
    finally:
        for build in builds:
            build.stop()
        sink.stop()
        fake.stop()


if __name__ == "__main__":
    main()
