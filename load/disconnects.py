"""Clients that leave: does the backend stop generating at once?

    .venv/bin/python load/disconnects.py --backend URL --model NAME [--root DIR] [--tries 3]
        [--load 0,32] [--modes fin,rst,fin-pipelined] [--max-tokens 1000] [--out FILE]

Starts the gateway as users run it (`python -m gateway serve`, the code of the checkout
``--root``, so two checkouts can be compared) in front of a running backend. For each way of
leaving (``fin``: a close; ``rst``: a close with SO_LINGER 0; ``-pipelined``: a second request
sent behind the first on the same connection), stream and non-stream, alone or beside
``--load`` streams in flight, a raw socket asks for ``--max-tokens`` tokens (ignore_eos) and
leaves ``--leave-after`` seconds after the backend shows it running. Measured:

- real vLLM: the tokens the leaving requests generated (vllm:generation_tokens_total, less what
  the background streams report in their usage), and, alone, the time from leaving until
  vllm:num_requests_running is 0 (sampled every 20 ms; one engine step is the floor);
- the fake (tests/fake_vllm.py, paced with --gap-ms): the time from leaving until the fake saw
  the abort (its `last_abort_us`, same clock).

Prints a markdown table and appends it to ``--out``. Every wait is bounded (``--wait``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Phase:
    mode: str
    stream: bool
    load: int
    tokens: list[float] = field(default_factory=list)  # per leaving request (or the mean)
    delays_ms: list[float] = field(default_factory=list)
    stuck: int = 0  # still generating when --wait ran out
    cut: int = 0  # background streams cut short (their tokens count as the victims')


def chat(model: str, tokens: int, stream: bool) -> bytes:
    doc = {
        "model": model,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": stream,
        "fake": {"chunks": tokens},
    }
    if stream:
        doc["stream_options"] = {"include_usage": True}
    return json.dumps(doc).encode()


def raw(body: bytes) -> bytes:
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


class Backend:
    def __init__(self, url: str) -> None:
        self.url = url
        self.fake = httpx.get(f"{url}/fake/stats").status_code == 200

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        pattern = rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$"
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))

    def tokens(self) -> float:
        return 0.0 if self.fake else self.metric("vllm:generation_tokens_total")

    def running(self) -> float:
        if self.fake:
            stats = httpx.get(f"{self.url}/fake/stats").json()
            return float(stats["started"] - stats["completed"] - stats["aborted"])
        return self.metric("vllm:num_requests_running") + self.metric("vllm:num_requests_waiting")

    def stats(self) -> dict[str, int]:
        result: dict[str, int] = httpx.get(f"{self.url}/fake/stats").json()
        return result


async def background(port: int, body: bytes, stop: asyncio.Event, usage: list[int]) -> None:
    """One stream after another until ``stop``; each one's generated tokens go to ``usage``."""
    async with httpx.AsyncClient(timeout=600) as client:
        while not stop.is_set():
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            try:
                async with client.stream("POST", url, content=body) as response:
                    async for line in response.aiter_lines():
                        if line.startswith("data: {") and '"usage":{' in line:
                            usage.append(json.loads(line[6:])["usage"]["completion_tokens"])
            except httpx.HTTPError:
                usage.append(-1)  # cut: its tokens are unknown, the phase's count is not exact


def send(port: int, data: bytes) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(data)
    return client


def leave(client: socket.socket, reset: bool) -> float:
    """A blocking socket's close is the system call, at once; the wall-clock time it left."""
    if reset:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    left = time.time()
    client.close()
    return left


async def until_running(backend: Backend, count: int, wait: float) -> None:
    """The request reached the engine (under load, vLLM's API server can take seconds)."""
    began = time.monotonic()
    while time.monotonic() - began < wait:
        if await asyncio.to_thread(backend.running) >= count:
            return
        await asyncio.sleep(0.02)


async def until_idle(backend: Backend, floor: float, wait: float) -> float | None:
    """Seconds until no more than ``floor`` requests run; None when ``wait`` ran out."""
    began = time.monotonic()
    while time.monotonic() - began < wait:
        if await asyncio.to_thread(backend.running) <= floor:
            return time.monotonic() - began
        await asyncio.sleep(0.02)
    return None


async def run_phase(args: argparse.Namespace, backend: Backend, phase: Phase, port: int) -> None:
    victim = raw(chat(args.model, args.max_tokens, phase.stream))
    if phase.mode.endswith("-pipelined"):
        victim += raw(chat(args.model, 4, False))
    reset = phase.mode.startswith("rst")
    stop, usage = asyncio.Event(), list[int]()
    bg_body = chat(args.model, args.load_tokens, True)
    workers = [
        asyncio.create_task(background(port, bg_body, stop, usage)) for _ in range(phase.load)
    ]
    await until_running(backend, phase.load, 30)  # the streams are in flight
    before = await asyncio.to_thread(backend.tokens)
    for _ in range(args.tries):
        aborts = (await asyncio.to_thread(backend.stats))["aborted"] if backend.fake else 0
        client = await asyncio.to_thread(send, port, victim)
        await until_running(backend, phase.load + 1, args.wait)
        await asyncio.sleep(args.leave_after)
        left = leave(client, reset)
        if backend.fake:
            began = time.monotonic()
            while time.monotonic() - began < args.wait:
                stats = await asyncio.to_thread(backend.stats)
                if stats["aborted"] != aborts:
                    break
                await asyncio.sleep(0.01)
            if stats["aborted"] == aborts:
                phase.stuck += 1
            else:
                phase.delays_ms.append((stats["last_abort_us"] / 1e6 - left) * 1000)
        elif not phase.load:
            idle = await until_idle(backend, 0, args.wait)
            if idle is None:
                phase.stuck += 1
                await until_idle(backend, 0, 600)
            else:
                phase.delays_ms.append(idle * 1000)
            await asyncio.sleep(1.0)  # the engine publishes its counters a moment later
            after = await asyncio.to_thread(backend.tokens)
            phase.tokens.append(after - before)
            before = after
        else:
            await asyncio.sleep(args.settle)
    stop.set()
    await asyncio.gather(*workers)
    if phase.load and not backend.fake:
        await until_idle(backend, 0, 600)
        await asyncio.sleep(1.0)
        after = await asyncio.to_thread(backend.tokens)
        phase.cut = usage.count(-1)
        counted = sum(n for n in usage if n >= 0)
        phase.tokens.append((after - before - counted) / args.tries)


def start_gateway(root: Path, backend: str, model: str) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = {
        "models": [{"name": model, "url": backend}],
        "timeouts": {"first_byte": 600, "idle": 600},
        "log_level": "info",
    }
    path = Path(tempfile.mkdtemp()) / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "gateway", "serve", "--config", str(path), "--port", str(port)]
    log = open(path.parent / "gateway.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                print(f"gateway ({root}) on {port}, log {log.name}", flush=True)
                return proc, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the gateway did not start")


def report(args: argparse.Namespace, phases: list[Phase], fake: bool) -> str:
    unit = "ms from leaving to the fake's abort" if fake else "ms until vLLM idle (alone)"
    lines = [
        f"| leaving | stream | in flight | tokens per leaving request | {unit} | stuck | cut |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        tokens = ", ".join(f"{t:.0f}" for t in p.tokens) if p.tokens else "-"
        delays = (
            f"median {statistics.median(p.delays_ms):.1f}, max {max(p.delays_ms):.1f}"
            if p.delays_ms
            else "-"
        )
        kind = "stream" if p.stream else "non-stream"
        lines.append(
            f"| {p.mode} | {kind} | {p.load} | {tokens} | {delays} | {p.stuck} | {p.cut} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--modes", default="fin,rst")
    parser.add_argument("--load", default="0,32")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=1000)
    parser.add_argument("--load-tokens", type=int, default=16)
    parser.add_argument("--leave-after", type=float, default=0.3)
    parser.add_argument("--wait", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=3.0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--label", default="this checkout", help="names --root's code in --out")
    args = parser.parse_args()
    backend = Backend(args.backend)
    proc, port = start_gateway(args.root, args.backend, args.model)
    phases = [
        Phase(mode, stream, int(load))
        for load in args.load.split(",")
        for mode in args.modes.split(",")
        for stream in (False, True)
    ]
    try:
        for phase in phases:
            await run_phase(args, backend, phase, port)
            print(report(args, [phase], backend.fake).splitlines()[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    table = report(args, phases, backend.fake)
    print(table)
    if args.out is not None:
        with args.out.open("a") as out:
            out.write(f"\n`{' '.join(sys.argv)}` (gateway code: {args.label})\n\n{table}\n")


if __name__ == "__main__":
    asyncio.run(main())
