"""The steps of load/gpu_check.sh, run on the GPU machine against the gateway on 127.0.0.1:8000.

Each step prints one JSON document (the shell script saves it); load/gpu_report.py turns the
documents into load/results/gpu-<date>.md.

    wait-ready --timeout S      until every replica of every model is ready
    wait-up --timeout S         until the gateway answers /health
    check                       chat, a stream, embeddings through the gateway
    kv LABEL                    each model's expected and actual KV cache, and nvidia-smi
    crash MODEL OTHER           kill -9 what `pkill -9 -f MODEL` hits; OTHER must keep serving
    bench MODEL TOKENIZER DIR   vLLM's benchmark client, direct and through the gateway, in
                                alternating rounds
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

GATEWAY = "http://127.0.0.1:8000"
HEADERS = {"Authorization": "Bearer sk-gpu-check"}


def status() -> dict[str, Any]:
    return httpx.get(f"{GATEWAY}/status.json", headers=HEADERS, timeout=5).json()  # type: ignore[no-any-return]


def states() -> dict[str, list[str]]:
    return {m["name"]: [r["state"] for r in m["replicas"]] for m in status()["models"]}


def wait_ready(timeout: float) -> dict[str, Any]:
    began = time.monotonic()
    seen: dict[str, list[str]] = {}
    while time.monotonic() - began < timeout:
        try:
            seen = states()
            if all(s and set(s) == {"ready"} for s in seen.values()):
                return {"ready_after_s": round(time.monotonic() - began, 1), "states": seen}
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"not ready after {timeout}s: {seen}")


def wait_up(timeout: float) -> dict[str, Any]:
    """Until the gateway answers /health (its models may still be loading, or on demand)."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if httpx.get(f"{GATEWAY}/health", timeout=2).status_code == 200:
                return {"up_after_s": round(time.monotonic() - began, 1)}
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the gateway did not answer /health within {timeout}s")


def complete(model: str, max_tokens: int = 8) -> int:
    """One completion through the gateway: its status, -1 for a failed connection, -2 for a
    timeout. (/v1/completions, which needs no chat template.)"""
    try:
        return httpx.post(
            f"{GATEWAY}/v1/completions",
            json={"model": model, "prompt": "hello", "max_tokens": max_tokens},
            headers=HEADERS,
            timeout=60,
        ).status_code
    except httpx.HTTPError as exc:
        return -1 if not isinstance(exc, httpx.TimeoutException) else -2


def gpu_memory() -> list[dict[str, Any]]:
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-compute-apps=pid,process_name,used_memory",
            "--format=csv,noheader,nounits",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    rows = [line.split(", ") for line in out.splitlines() if line.strip()]
    return [{"pid": int(r[0]), "name": r[1], "mib": float(r[2])} for r in rows if len(r) == 3]


def kv(label: str) -> dict[str, Any]:
    models = {
        m["name"]: [
            {"state": r["state"], "gpus": r["gpus"], "kv_cache": r["kv_cache"]}
            for r in m["replicas"]
        ]
        for m in status()["models"]
    }
    return {"label": label, "models": models, "nvidia_smi": gpu_memory()}


def processes(name: str) -> dict[str, int]:
    """The reaper and the API server of the served model ``name``, by their command lines."""
    found: dict[str, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" in argv and name in argv:
            found["reaper" if "backends.reaper" in argv else "server"] = int(entry.name)
    return found


def group(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def crash(name: str, other: str) -> dict[str, Any]:
    before = kv("before")
    hit = processes(name)
    tree = group(hit["reaper"])
    for pid in hit.values():  # what `pkill -9 -f <name>` hits; the engine core is spared
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    tree_gone = memory_free = back = None
    other_statuses: dict[int, int] = {}
    while time.monotonic() - killed < 420:
        now = time.monotonic() - killed
        if tree_gone is None and not [p for p in tree if p in group(hit["reaper"])]:
            tree_gone = now
        if memory_free is None and not {p["pid"] for p in gpu_memory()} & set(tree):
            memory_free = now
        code = complete(other)
        other_statuses[code] = other_statuses.get(code, 0) + 1
        if states().get(name) == ["ready"] and now > 3:
            back = time.monotonic() - killed
            break
        time.sleep(0.5)
    return {
        "killed": hit,
        "tree_before": tree,
        "tree_gone_after_s": None if tree_gone is None else round(tree_gone, 1),
        "gpu_memory_free_after_s": None if memory_free is None else round(memory_free, 1),
        "back_after_s": None if back is None else round(back, 1),
        f"{other}_statuses_meanwhile": other_statuses,
        "first_completion_after": complete(name),
        "before": before,
        "after": kv("after"),
    }


def direct_url(name: str) -> tuple[str, str]:
    argv = (Path("/proc") / str(processes(name)["server"]) / "cmdline").read_bytes()
    args = argv.decode().split("\0")
    return f"http://127.0.0.1:{args[args.index('--port') + 1]}", args[args.index("--api-key") + 1]


def bench_once(url: str, key: str, model: str, tokenizer: str, c: int, n: int, out: Path) -> Any:
    file = out / f"bench-{time.monotonic_ns()}.json"
    flags = (
        f"--backend openai --base-url {url} --endpoint /v1/completions --model {model}"
        f" --tokenizer {tokenizer} --dataset-name random --random-input-len 128"
        f" --random-output-len 128 --ignore-eos --num-prompts {n} --max-concurrency {c}"
        f" --save-result --result-dir {out} --result-filename {file.name}"
    )
    subprocess.run(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve", *flags.split()],
        env={**os.environ, "OPENAI_API_KEY": key},
        check=True,
        capture_output=True,
    )
    return json.loads(file.read_text())


def bench(model: str, tokenizer: str, out: Path, rounds: int) -> dict[str, Any]:
    """Direct and gateway take turns, the first of each round alternating, so a drift in the
    machine's speed biases neither."""
    out.mkdir(parents=True, exist_ok=True)
    direct, direct_key = direct_url(model)
    paths = {"direct": (direct, direct_key), "gateway": (GATEWAY, HEADERS["Authorization"][7:])}
    runs: list[dict[str, Any]] = []
    for concurrency, prompts in ((1, 16), (64, 512)):
        for r in range(rounds):
            order = ["direct", "gateway"] if r % 2 == 0 else ["gateway", "direct"]
            for path in order:
                result = bench_once(*paths[path], model, tokenizer, concurrency, prompts, out)
                runs.append(
                    {
                        "concurrency": concurrency,
                        "round": r,
                        "path": path,
                        "output_tok_s": result["output_throughput"],
                        "ttft_p50_ms": result["median_ttft_ms"],
                        "ttft_p99_ms": result["p99_ttft_ms"],
                        "itl_p50_ms": result.get("median_itl_ms"),
                        "completed": result["completed"],
                    }
                )
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    return {"model": model, "runs": runs, "summary": summarize(runs)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for c in sorted({r["concurrency"] for r in runs}):
        row: dict[str, Any] = {"concurrency": c}
        for path in ("direct", "gateway"):
            mine = [r for r in runs if r["concurrency"] == c and r["path"] == path]
            tput = [r["output_tok_s"] for r in mine]
            ttft = [r["ttft_p50_ms"] for r in mine]
            row[path] = {
                "output_tok_s_median": statistics.median(tput),
                "output_tok_s_range": [min(tput), max(tput)],
                "ttft_p50_ms_median": statistics.median(ttft),
                "rounds": len(mine),
            }
        row["ratio"] = row["gateway"]["output_tok_s_median"] / row["direct"]["output_tok_s_median"]
        rows.append(row)
    return rows


def listeners() -> dict[str, Any]:
    """Every listening TCP port and which process holds it (the device image has no `ss`)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                inodes[fields[9]] = int(fields[1].rsplit(":", 1)[1], 16)
    held: list[dict[str, Any]] = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            links = [os.readlink(fd) for fd in fd_dir.iterdir()]
            args = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
        for link in links:
            inode = link.removeprefix("socket:[").removesuffix("]")
            if link.startswith("socket:[") and inode in inodes:
                held.append({"port": inodes[inode], "pid": int(fd_dir.parent.name), "args": args})
    return {"tcp_listeners": sorted(held, key=lambda h: h["port"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("wait-ready").add_argument("--timeout", type=float, default=600)
    sub.add_parser("wait-up").add_argument("--timeout", type=float, default=60)
    sub.add_parser("kv").add_argument("label")
    sub.add_parser("listeners")
    crash_p = sub.add_parser("crash")
    crash_p.add_argument("name")
    crash_p.add_argument("other")
    bench_p = sub.add_parser("bench")
    bench_p.add_argument("model")
    bench_p.add_argument("tokenizer")
    bench_p.add_argument("dir", type=Path)
    bench_p.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.cmd == "wait-ready":
        doc = wait_ready(args.timeout)
    elif args.cmd == "wait-up":
        doc = wait_up(args.timeout)
    elif args.cmd == "kv":
        doc = kv(args.label)
    elif args.cmd == "listeners":
        doc = listeners()
    elif args.cmd == "crash":
        doc = crash(args.name, args.other)
    else:
        doc = bench(args.model, args.tokenizer, args.dir, args.rounds)
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
