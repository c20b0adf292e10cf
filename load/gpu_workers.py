"""`workers: 1` and `workers: 4` against direct on the GPU (issue 35). Run by
`load/gpu_check.sh workers` on the GPU machine.

    python3 load/gpu_workers.py TINY_CHAT_DIR OUT_DIR --save FILE.json
        [--concurrency 256,64,512] [--rounds 3] [--clients 4] [--waves 4]

One tiny chat server on GPU 0 (0.3 of it), started directly; two gateways in connect mode in
front of it at once (ports 8001 and 8004, `workers` 1 and 4). vLLM's benchmark client, split
over ``--clients`` processes so that it is not the limit, streams completions (128 in, 128
out) at each ``--concurrency`` in all; direct, workers 1 and workers 4 take turns, the first of
each round rotating. Per run: output tokens/s (summed over the clients), the clients' median
inter-token latency, and the CPU the gateway's processes used. Each run sends ``--waves``
times its concurrency in prompts (more: longer runs, less spread between rounds). On 12 cores
or more, vLLM, the gateways and the clients run on cores of their own (``layout``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

MODEL = "tiny-chat"
KEY = "sk-gpu-check"


def wait(url: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: its process exited")
        try:
            headers = {"Authorization": f"Bearer {KEY}"}
            if httpx.get(url + "/v1/models", headers=headers, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url}: not up in {timeout} s")


def gateway(workers: int, port: int, backend: str, state: Path) -> subprocess.Popen[bytes]:
    file = state / f"workers-{workers}.yaml"
    file.write_text(
        f"host: 127.0.0.1\nport: {port}\nworkers: {workers}\napi_keys: [sk-gpu-check]\n"
        f"log_dir: {state}/logs-w{workers}\nlog_level: warning\n"
        f"models:\n  - name: {MODEL}\n    url: {backend}\n    api_key: {KEY}\n"
    )
    log = open(state / f"gateway-w{workers}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(
        pinned(PLACE["gateway"], ["python3", "-m", "gateway", "serve", "--config", str(file)]),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def pinned(cpus: list[int] | None, cmd: list[str]) -> list[str]:
    """``cmd`` on ``cpus`` only (all of them when None): vLLM's server, the gateways and the
    benchmark clients each get cores of their own, so that none slows another by sharing."""
    return cmd if cpus is None else ["taskset", "-c", ",".join(map(str, cpus)), *cmd]


def layout() -> dict[str, list[int] | None]:
    """Where each part runs: on 12 cores or more, vLLM's processes on the first quarter, the
    gateways on the next three eighths, the clients on the rest; below that, unpinned."""
    total = os.cpu_count() or 1
    if total < 12 or shutil.which("taskset") is None:
        return {"vllm": None, "gateway": None, "clients": None}
    quarter, gate = total // 4, 3 * total // 8
    return {
        "vllm": list(range(quarter)),
        "gateway": list(range(quarter, quarter + gate)),
        "clients": list(range(quarter + gate, total)),
    }


PLACE = layout()


def tree_cpu(pid: int) -> float:
    """User + system seconds of ``pid`` and every descendant alive now."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return total


SERVER_SIDE = {  # vLLM's own histograms: what the server saw, whoever sent the requests
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "tpot": "vllm:time_per_output_token_seconds",
    "queued": "vllm:request_queue_time_seconds",
}


Sums = dict[str, tuple[float, float]]


def server_sums(direct: str) -> Sums:
    """(sum, count) of each of ``SERVER_SIDE``'s histograms in vLLM's /metrics now."""
    text = httpx.get(direct + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    sums: Sums = {}
    for short, name in SERVER_SIDE.items():
        total = count = 0.0
        for line in text.splitlines():
            if line.startswith(name + "_sum"):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "_count"):
                count += float(line.rsplit(" ", 1)[1])
        sums[short] = (total, count)
    return sums


def server_means(before: Sums, after: Sums) -> dict[str, float | None]:
    """Each histogram's mean over a run, in ms (None where vLLM does not export it)."""
    means: dict[str, float | None] = {}
    for short, (total, count) in after.items():
        was_total, was_count = before[short]
        n = count - was_count
        means[f"server_{short}_ms_mean"] = round(1e3 * (total - was_total) / n, 3) if n else None
    return means


def bench(
    url: str, tokenizer: str, c: int, clients: int, out: Path, waves: int = 4
) -> dict[str, Any]:
    procs, files = [], []
    for i in range(clients):
        file = out / f"bench-{time.monotonic_ns()}-{i}.json"
        flags = (
            f"--backend openai --base-url {url} --endpoint /v1/completions --model {MODEL}"
            f" --tokenizer {tokenizer} --dataset-name random --random-input-len 128"
            f" --random-output-len 128 --ignore-eos --num-prompts {waves * c // clients}"
            f" --max-concurrency {c // clients} --seed {i}"
            f" --save-result --result-dir {out} --result-filename {file.name}"
        )
        command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "bench", "serve"]
        procs.append(
            subprocess.Popen(
                pinned(PLACE["clients"], [*command, *flags.split()]),
                env={**os.environ, "OPENAI_API_KEY": KEY},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        files.append(file)
    for proc in procs:
        proc.wait(600)
    results = [json.loads(f.read_text()) for f in files]
    return {
        "output_tok_s": round(sum(r["output_throughput"] for r in results), 1),
        "itl_p50_ms": round(statistics.median(r["median_itl_ms"] for r in results), 3),
        "ttft_p50_ms": round(statistics.median(r["median_ttft_ms"] for r in results), 1),
        "completed": sum(r["completed"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--save", type=Path, required=True)
    parser.add_argument("--concurrency", default="256,64,512", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--waves", type=int, default=4, help="prompts per run: this many times the concurrency"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    port = 8100
    vllm = ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", args.model,
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--api-key", KEY, "--gpu-memory-utilization", "0.3", "--enforce-eager"]  # fmt: skip
    server = subprocess.Popen(
        pinned(PLACE["vllm"], vllm),
        stdout=open(args.out / "vllm.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    direct = f"http://127.0.0.1:{port}"
    gateways = {w: gateway(w, 8000 + w, direct, args.out) for w in (1, 4)}
    levels = [int(c) for c in args.concurrency.split(",")]
    doc: dict[str, Any] = {
        "concurrency": levels,
        "clients": args.clients,
        "waves": args.waves,
        "cores": PLACE,
        "runs": [],
    }
    try:
        wait(direct, 400, server)
        for w, proc in gateways.items():
            wait(f"http://127.0.0.1:{8000 + w}", 60, proc)
        targets = {"direct": direct, "workers-1": "http://127.0.0.1:8001",
                   "workers-4": "http://127.0.0.1:8004"}  # fmt: skip
        names = list(targets)
        bench(direct, args.model, 64, 1, args.out)  # warm-up, not counted
        for r in range(args.rounds):
            for c in levels:
                for name in names[r % 3 :] + names[: r % 3]:
                    pid = gateways[int(name[-1])].pid if name != "direct" else None
                    cpu = tree_cpu(pid) if pid else 0.0
                    began, seen = time.monotonic(), server_sums(direct)
                    run = bench(targets[name], args.model, c, args.clients, args.out, args.waves)
                    run.update(server_means(seen, server_sums(direct)))
                    run.update(target=name, concurrency=c, round=r)
                    run["seconds"] = round(time.monotonic() - began, 1)
                    if pid:
                        run["gateway_cpu_s"] = round(tree_cpu(pid) - cpu, 2)
                    doc["runs"].append(run)
                    args.save.write_text(json.dumps(doc, indent=1))
                    print(json.dumps(run), flush=True)
        summary: dict[str, Any] = {}
        for c in levels:
            for name in names:
                mine = [x for x in doc["runs"] if x["target"] == name and x["concurrency"] == c]
                summary[f"{name}@{c}"] = {
                    "output_tok_s_median": statistics.median(x["output_tok_s"] for x in mine),
                    "itl_p50_ms_median": statistics.median(x["itl_p50_ms"] for x in mine),
                }
        doc["summary"] = summary
        args.save.write_text(json.dumps(doc, indent=1))
    finally:
        for proc in [*gateways.values(), server]:
            proc.terminate()
        for proc in [*gateways.values(), server]:
            proc.wait(60)


if __name__ == "__main__":
    main()
