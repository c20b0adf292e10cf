"""The relay's own CPU per request, in-process: no sockets, no server, no HTTP parsing.

    .venv/bin/python load/relay_cpu.py [--base REV] [--runs 6] [--requests 2000]

What ``load/ab.py`` cannot separate on a shared machine: the gateway's own code between the
ASGI server and the HTTP client. The relay (inside the error boundary, where the build has
one) serves requests from backends served in-process (``gateway/inprocess.py``, taken from
the working tree for both builds): a JSON answer, and a stream of 64 events read one at a
time. Each build runs in its own process, the builds take turns ``--runs`` times, and the
least CPU time per request of each is reported (the machine's noise only ever adds).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import ROOT, checkout

_CHILD = r"""
import asyncio, importlib.util, sys, time
sys.path.insert(0, sys.argv[1])
import orjson, uvloop
from backends.pool import Replica, ReplicaPool
from gateway.interrupt import CLIENT_GONE, ClientGone
from gateway.relay import Relay, RelayLimits
from gateway.routing import RouteTable
from gateway.telemetry import Telemetry
spec = importlib.util.spec_from_file_location("inprocess", sys.argv[2])
inprocess = sys.modules["inprocess"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inprocess)
N = int(sys.argv[3])
EVENT = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'

class Stream(inprocess.Reply):
    def __init__(self):
        super().__init__(200, [(b"content-type", b"text/event-stream")])
        self.left = 64
    async def readany(self):
        if self.left == 0:
            return b""
        self.left -= 1
        return EVENT
    @property
    def complete(self):
        return self.left == 0

async def answer_json(sent):
    usage = {"prompt_tokens": 3, "completion_tokens": 5}
    return inprocess.Reply.json({"id": "x", "choices": [], "usage": usage})

async def answer_stream(sent):
    return Stream()

def app_for(handler):
    pool = ReplicaPool("m", [Replica(url="http://a")])
    upstreams = inprocess.InProcessUpstreams({"http://a": handler})
    limits = RelayLimits(1 << 20, 60, 60)
    app = Relay(RouteTable([(pool, [])]), upstreams, limits, Telemetry([pool]))
    try:
        from gateway.boundary import ErrorBoundary
    except ImportError:
        return app
    return ErrorBoundary(app)

async def request(app, body):
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions",
             "query_string": b"", "headers": headers, "extensions": {CLIENT_GONE: ClientGone()}}
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}
    async def send(message):
        pass
    await app(scope, receive, send)

async def main():
    body = orjson.dumps({"model": "m", "messages": []})
    for name, handler in (("json", answer_json), ("stream 64 events", answer_stream)):
        app = app_for(handler)
        for _ in range(N // 10):
            await request(app, body)
        began = time.process_time()
        for _ in range(N):
            await request(app, body)
        print(name, (time.process_time() - began) / N * 1e6)

uvloop.install()
asyncio.run(main())
"""


def measure(root: Path, requests: int) -> dict[str, float]:
    inprocess = ROOT / "gateway" / "inprocess.py"
    args = [sys.executable, "-c", _CHILD, str(root), str(inprocess), str(requests)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=root)
    if done.returncode != 0:
        raise SystemExit(f"the build in {root} failed:\n{done.stderr}")
    out = done.stdout
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in out.splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="HEAD", help="the git revision to compare against")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    best: dict[str, dict[str, float]] = {args.base: {}, "working tree": {}}
    with checkout(args.base) as base_dir:
        for _ in range(args.runs):
            for name, root in ((args.base, base_dir), ("working tree", ROOT)):
                for scenario, cpu in measure(root, args.requests).items():
                    best[name][scenario] = min(cpu, best[name].get(scenario, cpu))
    print("| scenario | build | CPU µs/request (least of runs) |")
    print("|---|---|---|")
    for scenario in best[args.base]:
        for name in best:
            print(f"| {scenario} | {name} | {best[name][scenario]:.1f} |")


if __name__ == "__main__":
    main()
