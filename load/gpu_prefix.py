"""`balance: prefix` against `least_outstanding` on the GPU (issue 33): time to first token.
Run by `load/gpu_check.sh prefix` on the GPU machine.

    python3 load/gpu_prefix.py MODEL_DIR LOG_DIR --save FILE.json [--blocks N] [--rounds 3]

Two replicas of a 7B-shape model on GPU 0 (0.4 each, started one after the other, in connect
mode behind an in-process gateway, as load/prefix_cache.py does on the CPU), many
conversations with long system prompts, turns interleaved, sent by concurrent clients as
streams: per request, the time to the first token. ``--blocks`` caps each replica's KV cache
(`--num-gpu-blocks-override`) so that all conversations do not fit one replica and half fit
each; 0 leaves vLLM's own size. The policies alternate for ``--rounds`` rounds, each phase on
its own gateway, with texts of its own, the caches reset before it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from statistics import median, quantiles
from typing import Any

import httpx
import prefix_cache as pc

from backends.process import free_port

pc.SYSTEM_TOKENS = 2000
CONVERSATIONS, TURNS, CLIENTS, MAX_TOKENS = 32, 6, 16, 32


def start(model: str, logs: Path, index: int, blocks: int) -> pc.Server:
    port = free_port()
    args = [
        "python3", "-m", "vllm.entrypoints.openai.api_server", "--model", model,
        "--served-model-name", pc.MODEL, "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.4", "--enforce-eager", "--dtype", "bfloat16",
        "--max-model-len", "8192",
    ]  # fmt: skip
    if blocks:
        args += ["--num-gpu-blocks-override", str(blocks)]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "0"}
    log = open(logs / f"prefix-{index}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    return pc.Server(port, proc)


async def converse(gateway: str, prompts: list[str], rng: random.Random) -> list[float]:
    """Every conversation's turns, interleaved, by CLIENTS at once: each turn's TTFT."""
    conversations = [[{"role": "system", "content": p}] for p in prompts]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for t in range(TURNS):
        for c in range(len(prompts)):
            queue.put_nowait((c, t))
    firsts: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            c, t = queue.get_nowait()
            messages = conversations[c]
            word = rng.choice(pc.WORDS)
            messages.append({"role": "user", "content": f"Turn {t}: the {word}?"})
            body = {"model": pc.MODEL, "messages": messages, "max_tokens": MAX_TOKENS,
                    "temperature": 0, "stream": True}  # fmt: skip
            began, first, text = time.perf_counter(), None, []
            async with http.stream("POST", gateway + "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                    if delta:
                        first = first or time.perf_counter() - began
                        text.append(delta)
            firsts.append(first if first is not None else time.perf_counter() - began)
            messages.append({"role": "assistant", "content": "".join(text)})

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))
    return firsts


def phase(policy: str, servers: list[pc.Server], seed: int) -> dict[str, Any]:
    for server in servers:
        httpx.post(server.url + "/reset_prefix_cache", timeout=60).raise_for_status()
    rng = random.Random(seed)
    prompts = [pc.system_prompt(rng, servers[0]) for _ in range(CONVERSATIONS)]
    before = [pc.counters(s) for s in servers]
    gateway = pc.Gateway([s.url for s in servers], policy)
    began = time.monotonic()
    try:
        firsts = asyncio.run(converse(gateway.url, prompts, rng))
    finally:
        gateway.close()
    after = [pc.counters(s) for s in servers]

    def delta(name: str) -> list[float]:
        return [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True)]

    queries, hits = sum(delta("prefix_cache_queries_total")), sum(delta("prefix_cache_hits_total"))
    served = delta("request_success_total")
    cuts = quantiles(firsts, n=20)
    return {
        "policy": policy,
        "seconds": round(time.monotonic() - began, 1),
        "requests": len(firsts),
        "ttft_p50_ms": round(median(firsts) * 1000, 1),
        "ttft_p95_ms": round(cuts[18] * 1000, 1),
        "hit_rate": round(hits / queries, 3) if queries else None,
        "prompt_tokens_computed": queries - hits,
        "shares": [round(n / sum(served), 3) for n in served] if sum(served) else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("logs", type=Path)
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--blocks", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    servers: list[pc.Server] = []
    doc: dict[str, Any] = {"blocks": args.blocks, "conversations": CONVERSATIONS,
                           "turns": TURNS, "clients": CLIENTS, "system_tokens": pc.SYSTEM_TOKENS,
                           "phases": []}  # fmt: skip
    try:
        for i in range(2):  # one after the other: each sizes its KV cache from what is free
            servers.append(start(args.model, args.logs, i, args.blocks))
            pc.wait_ready(servers[-1:], timeout=400)
        doc["cache"] = [pc.counters(s) for s in servers]
        for r in range(args.rounds):
            for policy in ("least_outstanding", "prefix"):
                doc["phases"].append(phase(policy, servers, seed=100 * r + len(doc["phases"])))
                args.save.write_text(json.dumps(doc, indent=1))
                print(json.dumps(doc["phases"][-1]), flush=True)
    finally:
        for server in servers:
            server.proc.terminate()
        for server in servers:
            server.proc.wait(60)
    sys.exit(0)


if __name__ == "__main__":
    main()
