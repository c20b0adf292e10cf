"""The swap scheduler against LRU on the GPU (issue 32), run by `load/gpu_check.sh swaps`.

    python3 load/gpu_swaps.py BIG_MODEL_DIR TINY_CHAT_DIR STATE_DIR --save FILE.json
        [--rounds 2] [--seconds 60]

Two on-demand 7B-shape models at 0.6 of GPU 0 each (they cannot share it; `unload: sleep`,
level 2) and an on-demand tiny chat model at 0.2 (it fits beside one of them, not both), one
gateway. A warm-up starts each once (the cold starts are not counted), then one seeded trace
(``swap_traces.gpu_sessions``: a hot model, a warm one, a rare one, in sessions) is replayed
in real time, the policies taking turns (`swaps.policy` changed by `POST /admin/reload`,
every model put to sleep before each replay, the first policy of each round alternating).
Per replay: first-token latency p50/p95/p99 per model, requests answered, lost, and the
swaps the gateway counted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_steps import GATEWAY, HEADERS, wait_up
from swap_traces import Row, gpu_sessions

MODELS = {"sleep-a": 0.6, "sleep-b": 0.6, "tiny-c": 0.2}


def config(big: str, tiny: str, state: Path, policy: str) -> str:
    lines = [
        "host: 127.0.0.1",
        "port: 8000",
        "api_keys: [{name: ops, key: sk-gpu-check, admin: true}]",
        "launcher: [python3, -m, vllm.entrypoints.openai.api_server]",
        f"log_dir: {state}/logs",
        f"swaps: {{policy: {policy}}}",
        "models:",
    ]
    for name, share in MODELS.items():
        lines += [
            f"  - name: {name}",
            "    vllm:",
            f"      model: {tiny if name == 'tiny-c' else big}",
            "      gpus: [0]",
            f"      args: {{gpu-memory-utilization: {share}, enforce-eager: true, "
            f"dtype: bfloat16{'' if name == 'tiny-c' else ', max-model-len: 4096'}}}",
            "    on_demand: {idle_ttl: 3600, min_resident: 0, start_timeout: 600, "
            "unload: sleep, sleep_level: 2}",
        ]
    return "\n".join(lines) + "\n"


async def ask(client: httpx.AsyncClient, row: Row) -> dict[str, Any]:
    body = {
        "model": row.model,
        "messages": [{"role": "user", "content": "hi " * row.prompt}],
        "max_tokens": row.output,
        "stream": True,
    }
    sent = time.monotonic()
    first = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as answer:
            async for chunk in answer.aiter_bytes():
                if first is None and b'"content"' in chunk:
                    first = time.monotonic() - sent
            status = answer.status_code
    except httpx.HTTPError:
        status = 0
    return {"model": row.model, "status": status, "ttft_s": first}


async def replay(rows: list[Row]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=GATEWAY, headers=HEADERS, timeout=600) as client:
        began, tasks = time.monotonic(), []
        for row in rows:
            delay = began + row.t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(ask(client, row)))
        return list(await asyncio.gather(*tasks))


def swaps() -> float:
    text = httpx.get(f"{GATEWAY}/metrics", headers=HEADERS, timeout=10).text
    prefix = "vllm_gateway_model_swapped_out_total{"
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(prefix))


def quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    if len(values) == 1:
        values = values * 2
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(cuts[49], 3), "p95": round(cuts[94], 3), "p99": round(cuts[98], 3)}


def put_to_sleep() -> None:
    for name in MODELS:
        httpx.post(f"{GATEWAY}/admin/models/{name}/sleep", headers=HEADERS, timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("big")
    parser.add_argument("tiny")
    parser.add_argument("state", type=Path)
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    file = args.state / "swaps.yaml"
    file.write_text(config(args.big, args.tiny, args.state, "lru"))
    log = open(args.state / "swaps-gateway.log", "ab")  # noqa: SIM115
    gateway = subprocess.Popen(
        ["python3", "-m", "gateway", "serve", "--config", str(file)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    rows = gpu_sessions(seconds=args.seconds)
    doc: dict[str, Any] = {"requests": len(rows), "seconds": args.seconds, "warm_up": {}}
    doc["runs"] = []
    try:
        wait_up(60)
        for name in MODELS:  # the cold starts, not counted
            began = time.monotonic()
            answer = asyncio.run(replay([Row(0.0, name, "warm-up", prompt=8, output=4)]))[0]
            took = round(time.monotonic() - began, 1)
            doc["warm_up"][name] = {"status": answer["status"], "s": took}
            print(name, doc["warm_up"][name], flush=True)
        for r in range(args.rounds):
            for policy in ("lru", "cost") if r % 2 == 0 else ("cost", "lru"):
                file.write_text(config(args.big, args.tiny, args.state, policy))
                reload = httpx.post(f"{GATEWAY}/admin/reload", headers=HEADERS, timeout=120)
                put_to_sleep()
                before = swaps()
                answers = asyncio.run(replay(rows))
                run: dict[str, Any] = {"round": r, "policy": policy, "reload": reload.status_code}
                run["swaps"] = int(swaps() - before)
                run["answered"] = sum(a["status"] == 200 for a in answers)
                run["lost"] = len(answers) - run["answered"]
                run["ttft_s"] = quantiles([a["ttft_s"] for a in answers if a["ttft_s"] is not None])
                for name in MODELS:
                    mine = [a["ttft_s"] for a in answers if a["model"] == name and a["ttft_s"]]
                    run[name] = quantiles(mine) | {"requests": len(mine)}
                doc["runs"].append(run)
                args.save.write_text(json.dumps(doc, indent=1))
                print(json.dumps(run), flush=True)
    finally:
        gateway.terminate()
        gateway.wait(120)


if __name__ == "__main__":
    main()
