"""How much prompt work `balance: prefix` saves on real vLLM CPU servers (issue 33).

    .venv/bin/python load/prefix_cache.py [--blocks 40] [--blocks 0] [--rounds 2]
        [--out load/results/prefix-2026-12-03.md] [--events DIR]

Two tiny-chat replicas (vLLM's CPU build caches prefixes in blocks of 128 tokens and counts
`vllm:prefix_cache_queries_total` and `hits_total`), eight conversations with system prompts of
about 660 tokens, six turns each, turns interleaved so that every conversation stays live, sent
by two clients at once. Each ``--blocks`` value is one pair of servers (40: eight conversations
do not fit one replica's cache, four fit each; 0: vLLM's default cache, no pressure). On each
pair the policies take turns for ``--rounds`` rounds, each phase on its own gateway and with
texts of its own, the replicas' prefix caches reset before it (vLLM's dev endpoint): one
replica alone, `least_outstanding` over both, `prefix` over both. Per phase: the fleet's hit
rate, the prompt tokens computed (queries - hits, the miss) and each replica's share of the
requests. ``--events DIR`` also records the raw KV-cache events the servers publish.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from backends.process import free_port  # noqa: E402
from gateway.app import create_app  # noqa: E402
from gateway.config_file import settings_from_dict  # noqa: E402
from gateway.server import uvicorn_config  # noqa: E402

MODEL = "tiny-chat"
CONVERSATIONS, TURNS, CLIENTS = 8, 6, 2
SYSTEM_TOKENS = 660
MAX_TOKENS = 16
WORDS = (
    "harbour tide berth pilot cargo manifest crane quay ferry schedule vessel anchor draught "
    "customs weather swell buoy lock gate tug barge container reefer bunker dredge channel"
).split()
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_SERVER_DEV_MODE": "1",  # for /reset_prefix_cache between phases
}


@dataclass
class Server:
    port: int
    proc: subprocess.Popen[bytes]
    events_port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(core: int, blocks: int, log: Path, events_port: int | None) -> Server:
    port = free_port()
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(ROOT / ".cache" / "tiny-models" / "chat"),
        "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--distributed-executor-backend", "uni",
        "--max-model-len", "2048",
    ]  # fmt: skip
    if blocks:
        args += ["--num-gpu-blocks-override", str(blocks)]
    if events_port is not None:  # vLLM connects to a non-wildcard endpoint: we bind
        endpoint = f"tcp://127.0.0.1:{events_port}"
        config = f'{{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"{endpoint}"}}'
        args += ["--kv-events-config", config]
    env = {**os.environ, **CPU_ENV, "VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends.reaper", "--", *args],
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=env,
        cwd=ROOT,
    )
    return Server(port, proc, events_port)


def wait_ready(servers: list[Server], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    for server in servers:
        while True:
            if server.proc.poll() is not None:
                raise SystemExit(f"vLLM on port {server.port} exited; see its log")
            try:
                if httpx.get(server.url + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"vLLM on port {server.port} not ready in {timeout:.0f} s")
            time.sleep(1)


def counters(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        for name in ("prefix_cache_queries_total", "prefix_cache_hits_total",
                     "request_success_total"):  # fmt: skip
            if line.startswith(f"vllm:{name}{{"):
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
        if line.startswith("vllm:cache_config_info{"):
            for label in ("block_size", "num_gpu_blocks"):
                if value := re.search(rf'[{{,]{label}="(\d+)"', line):
                    found[label] = float(value.group(1))
    return found


class Gateway:
    """The gateway in this process under uvicorn (a thread), for one phase."""

    def __init__(self, urls: list[str], balance: str) -> None:
        self.port = free_port()
        model = {"name": MODEL, "urls": urls, "balance": balance}
        settings = settings_from_dict({"models": [model], "log_level": "warning"}, env={})
        config = uvicorn_config(
            create_app(settings), settings, host="127.0.0.1", port=self.port,
            log_level="warning", lifespan="on",
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not start")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def system_prompt(rng: random.Random, tokenizer: Server) -> str:
    """About SYSTEM_TOKENS tokens of the tiny model's tokenizer, text of its own."""
    words: list[str] = []
    while True:
        words += [rng.choice(WORDS) for _ in range(20)]
        text = "You are the harbour office's assistant. Facts: " + " ".join(words) + "."
        body = {"model": MODEL, "prompt": text}
        count = httpx.post(tokenizer.url + "/tokenize", json=body, timeout=10).json()["count"]
        if count >= SYSTEM_TOKENS:
            return text


@dataclass
class Phase:
    name: str
    blocks: int
    hit_rate: float
    computed: float  # prompt tokens computed: queries - hits
    queries: float
    shares: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def converse(gateway: str, prompts: list[str], rng: random.Random) -> None:
    """Eight conversations, turns interleaved, two clients at once."""
    conversations = [[{"role": "system", "content": p}] for p in prompts]
    order = [(c, t) for t in range(TURNS) for c in range(len(prompts))]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for item in order:
        queue.put_nowait(item)

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            c, t = queue.get_nowait()
            messages = conversations[c]
            question = (
                f"Turn {t}: what about the {rng.choice(WORDS)} at berth {rng.randint(1, 99)}?"
            )
            messages.append({"role": "user", "content": question})
            body = {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS,
                    "temperature": 0}  # fmt: skip
            response = await http.post(gateway + "/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()["choices"][0]["message"]["content"] or ""
            messages.append({"role": "assistant", "content": answer})

    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))


def run_phase(name: str, servers: list[Server], used: list[Server], blocks: int,
              seed: int) -> Phase:  # fmt: skip
    for server in servers:
        httpx.post(server.url + "/reset_prefix_cache", timeout=30).raise_for_status()
    rng = random.Random(seed)
    prompts = [system_prompt(rng, servers[0]) for _ in range(CONVERSATIONS)]
    before = [counters(s) for s in servers]
    gateway = Gateway([s.url for s in used], name if name != "single" else "least_outstanding")
    started = time.monotonic()
    try:
        asyncio.run(converse(gateway.url, prompts, rng))
    finally:
        gateway.close()
    seconds = time.monotonic() - started
    after = [counters(s) for s in servers]
    queries = [a["prefix_cache_queries_total"] - b["prefix_cache_queries_total"]
               for a, b in zip(after, before, strict=True)]  # fmt: skip
    hits = [a["prefix_cache_hits_total"] - b["prefix_cache_hits_total"]
            for a, b in zip(after, before, strict=True)]  # fmt: skip
    total_q = sum(queries)
    served = [a.get("request_success_total", 0.0) - b.get("request_success_total", 0.0)
              for a, b in zip(after, before, strict=True)]  # fmt: skip
    shares = [n / sum(served) for n in served] if sum(served) else []
    return Phase(name, blocks, sum(hits) / total_q, total_q - sum(hits), total_q, shares, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, action="append", help="0: vLLM's default cache")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--events", type=Path, help="record the KV-cache events here")
    args = parser.parse_args()
    logs = ROOT / ".artifacts"
    logs.mkdir(exist_ok=True)
    phases: list[Phase] = []
    for blocks in args.blocks or [40, 0]:
        events = [free_port() for _ in range(2)] if args.events else [None, None]
        recorders = [EventRecorder(p, args.events / f"events-{blocks}-{i}.bin")
                     for i, p in enumerate(events) if p is not None]  # fmt: skip
        servers = [start_server(i, blocks, logs / f"prefix-cache-{i}.log", events[i])
                   for i in range(2)]  # fmt: skip
        try:
            wait_ready(servers)
            info = counters(servers[0])
            print(f"blocks {blocks or 'default'}: vLLM block size {info['block_size']:.0f}, "
                  f"{info['num_gpu_blocks']:.0f} blocks per replica", flush=True)  # fmt: skip
            for round_ in range(args.rounds):
                for index, (name, used) in enumerate(
                    (("single", servers[:1]), ("least_outstanding", servers), ("prefix", servers))
                ):
                    seed = blocks * 100 + round_ * 10 + index
                    phase = run_phase(name, servers, used, blocks, seed)
                    phases.append(phase)
                    print(describe(phase), flush=True)
        finally:
            for server in servers:
                server.proc.send_signal(signal.SIGTERM)
            for server in servers:
                server.proc.wait(60)
            for recorder in recorders:
                recorder.stop()
    report = summary(phases)
    print(report)
    if args.out:
        command = "    .venv/bin/python load/prefix_cache.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"{command}\n\n{report}\n")


def describe(phase: Phase) -> str:
    shares = " / ".join(f"{s:.2f}" for s in phase.shares)
    return (f"{phase.blocks or 'default':>7} {phase.name:<18} hit rate {phase.hit_rate:.3f}  "
            f"computed {phase.computed:>6.0f} of {phase.queries:>6.0f} tokens  "
            f"shares {shares}  {phase.seconds:.1f} s")  # fmt: skip


def summary(phases: list[Phase]) -> str:
    lines = ["| cache | policy | hit rate (median) | prompt tokens computed (median) | "
             "largest share of requests (max) |", "|---|---|---|---|---|"]  # fmt: skip
    for blocks in dict.fromkeys(p.blocks for p in phases):
        for name in ("single", "least_outstanding", "prefix"):
            mine = [p for p in phases if p.blocks == blocks and p.name == name]
            if not mine:
                continue
            largest = max(max(p.shares) for p in mine if p.shares) if name != "single" else 1.0
            lines.append(f"| {blocks or 'default'} | {name} | "
                         f"{median(p.hit_rate for p in mine):.3f} | "
                         f"{median(p.computed for p in mine):.0f} | {largest:.2f} |")  # fmt: skip
    return "\n".join(lines)


class EventRecorder:
    """Binds a ZMQ SUB socket that one server's KV-event publisher connects to, and writes
    each message's frames (length-prefixed, 0xFFFFFFFF after a message) to ``path``."""

    def __init__(self, port: int, path: Path) -> None:
        import zmq

        path.parent.mkdir(parents=True, exist_ok=True)
        self.socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
        self.socket.bind(f"tcp://127.0.0.1:{port}")
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.file = open(path, "wb")  # noqa: SIM115
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.running:
            if self.socket.poll(200):
                for frame in self.socket.recv_multipart():
                    self.file.write(len(frame).to_bytes(4, "big") + frame)
                self.file.write(b"\xff\xff\xff\xff")

    def stop(self) -> None:
        self.running = False
        self.thread.join(5)
        self.file.close()
        self.socket.close(0)


if __name__ == "__main__":
    main()
