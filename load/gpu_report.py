"""Helpers of load/gpu_check.sh: wait for the backends, check the endpoints, kill one, report.

Runs on the GPU machine against the gateway on 127.0.0.1:8000 (key sk-gpu-check).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

GATEWAY = "http://127.0.0.1:8000"
HEADERS = {"Authorization": "Bearer sk-gpu-check"}
TARGET_THROUGHPUT = 0.95  # through the gateway / direct
TARGET_TTFT_MS = 2.0  # added at p50


def status() -> dict[str, Any]:
    return httpx.get(f"{GATEWAY}/status.json", headers=HEADERS, timeout=5).json()  # type: ignore[no-any-return]


def states() -> dict[str, list[str]]:
    return {m["name"]: [r["state"] for r in m["replicas"]] for m in status()["models"]}


def wait_ready(timeout: float) -> int:
    deadline = time.monotonic() + timeout
    began = time.monotonic()
    while time.monotonic() < deadline:
        try:
            found = states()
            if all(s == ["ready"] for s in found.values()):
                print(f"all ready after {time.monotonic() - began:.0f}s: {found}", flush=True)
                return 0
        except httpx.HTTPError:
            pass
        time.sleep(2)
    print("not ready in time", file=sys.stderr)
    return 1


def check() -> dict[str, Any]:
    client = httpx.Client(base_url=GATEWAY, headers=HEADERS, timeout=60)
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
    )
    with client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 16,
            "stream": True,
        },
    ) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    embed = client.post("/v1/embeddings", json={"model": "tiny-embed", "input": ["a", "b c"]})
    rerank = client.post(
        "/v1/rerank",
        json={"model": "tiny-rerank", "query": "gpu", "documents": ["a gpu", "a cat", "a dog"]},
    )
    return {
        "chat": {"status": chat.status_code, "model": chat.json().get("model")},
        "stream": {"events": len(events), "last": events[-1] if events else None},
        "embeddings": {
            "status": embed.status_code,
            "vectors": len(embed.json().get("data", [])),
            "dim": len(embed.json()["data"][0]["embedding"]) if embed.status_code == 200 else 0,
        },
        "rerank": {
            "status": rerank.status_code,
            "order": [r["index"] for r in rerank.json().get("results", [])],
        },
    }


def server(name: str) -> tuple[int, list[str]]:
    """The pid and command line of the vLLM server serving ``name`` (not its reaper)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if (
            "vllm.entrypoints.openai.api_server" in argv
            and "backends.reaper" not in argv
            and name in argv
        ):
            return int(entry.name), argv
    raise LookupError(f"no vLLM server for {name}")


def kill_one(name: str) -> dict[str, Any]:
    pid, _ = server(name)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    others: dict[int, int] = {}
    back = None
    while time.monotonic() - killed < 300:
        chat = httpx.post(
            f"{GATEWAY}/v1/chat/completions",
            json={
                "model": "tiny-chat",
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 4,
            },
            headers=HEADERS,
            timeout=30,
        )
        others[chat.status_code] = others.get(chat.status_code, 0) + 1
        if states()[name] == ["ready"] and time.monotonic() - killed > 3:
            back = time.monotonic() - killed
            break
        time.sleep(0.5)
    model = next(m for m in status()["models"] if m["name"] == name)
    return {
        "killed_pid": pid,
        "chat_statuses_meanwhile": others,
        "back_after_s": None if back is None else round(back, 1),
        "restarts": model["replicas"][0]["restarts"],
    }


def report(out: Path) -> str:
    lines = [f"# GPU check, {time.strftime('%Y-%m-%d')}", ""]
    smi = (out / "gpu-nvidia-smi.csv").read_text()
    lines += ["Command: `load/gpu_check.sh BUNDLE` (this file is its output).", ""]
    lines += [
        "## Endpoints through the gateway",
        "",
        "```json",
        (out / "gpu-check.json").read_text().strip(),
        "```",
        "",
    ]
    lines += [
        "## GPU memory (nvidia-smi, all three backends ready)",
        "",
        "```",
        smi.strip(),
        "```",
        "",
    ]
    lines += [
        "Slices asked for: tiny-chat 0.3, tiny-embed 0.1, tiny-rerank 0.1 of the GPU. vLLM fills "
        "a generating model's slice with KV cache; pooling models (embed, rerank) have none, so "
        "they take only what their weights and activations need, well inside their slice.",
        "",
    ]
    lines += [
        "## Killing tiny-embed with SIGKILL",
        "",
        "```json",
        (out / "gpu-kill.json").read_text().strip(),
        "```",
        "",
    ]
    lines += ["## vLLM's benchmark client (random 128 in / 128 out, streaming /v1/completions)", ""]
    lines += [
        "| concurrency | path | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | done |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for c in (1, 64):
        rows = {}
        for path in ("direct", "gateway"):
            file = out / f"gpu-bench-{path}-c{c}.json"
            if not file.exists():
                continue
            r = json.loads(file.read_text())
            rows[path] = r
            lines.append(
                f"| {c} | {path} | {r['output_throughput']:.0f} | {r['median_ttft_ms']:.2f} | "
                f"{r['p99_ttft_ms']:.2f} | {r.get('median_itl_ms', 0):.2f} | {r['completed']} |"
            )
        if len(rows) == 2:
            ratio = rows["gateway"]["output_throughput"] / rows["direct"]["output_throughput"]
            added = rows["gateway"]["median_ttft_ms"] - rows["direct"]["median_ttft_ms"]
            ok = ratio >= TARGET_THROUGHPUT and added <= TARGET_TTFT_MS
            verdicts.append(
                f"- c={c}: gateway/direct throughput {ratio:.3f} (target >= {TARGET_THROUGHPUT}), "
                f"added TTFT p50 {added:+.2f} ms (target <= {TARGET_TTFT_MS}): "
                + ("met" if ok else "MISSED")
            )
    lines += ["", *verdicts, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    wait = sub.add_parser("wait-ready")
    wait.add_argument("--timeout", type=float, default=420)
    sub.add_parser("check")
    kill = sub.add_parser("kill-one")
    kill.add_argument("name")
    direct = sub.add_parser("direct", help="print the port and key of a backend")
    direct.add_argument("name")
    rep = sub.add_parser("report")
    rep.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.cmd == "wait-ready":
        return wait_ready(args.timeout)
    if args.cmd == "check":
        print(json.dumps(check(), indent=2))
    elif args.cmd == "direct":
        _, argv = server(args.name)
        print(argv[argv.index("--port") + 1], argv[argv.index("--api-key") + 1])
    elif args.cmd == "kill-one":
        print(json.dumps(kill_one(args.name), indent=2))
    else:
        print(report(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
