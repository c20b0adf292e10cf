"""The sleep-mode proof of load/gpu_check.sh (phase `sleep`), against the gateway on :8000.

Two on-demand models that cannot share GPU 0 (0.6 of it each), `unload: sleep`: cold starts,
then alternating requests (each one a swap: the other model falls asleep, this one wakes),
nvidia-smi after each swap (how much of the sleeper's memory it gave back), 16 clients racing
the swaps, and level-1 rounds (admin sleep at level 1, then a request wakes it). Prints one JSON
document; `report FILE` turns it into a markdown section for load/results/gpu-<date>.md.

    python3 load/gpu_sleep.py run A B --save FILE [--alternations N] [--race S] [--level1-rounds N]
    python3 load/gpu_sleep.py report sleep.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

GATEWAY = "http://127.0.0.1:8000"
HEADERS = {"Authorization": "Bearer sk-gpu-check"}  # an admin key in the sleep config
HUNG = 300.0  # seconds: a request slower than this counts as hung


def first_token(model: str, max_tokens: int = 16) -> dict[str, Any]:
    """One streamed completion: status, seconds to the first token, the gateway's start wait."""
    began = time.monotonic()
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens, "stream": True}
    result: dict[str, Any] = {"model": model}
    try:
        with httpx.stream(
            "POST", f"{GATEWAY}/v1/completions", json=body, headers=HEADERS, timeout=HUNG
        ) as response:
            result["status"] = response.status_code
            result["start_wait_s"] = float(response.headers.get("x-vllm-gateway-start-wait", 0))
            for line in response.iter_lines():
                if line.startswith("data: ") and "ttft_s" not in result:
                    result["ttft_s"] = round(time.monotonic() - began, 3)
    except httpx.HTTPError as exc:
        result["status"] = -2 if isinstance(exc, httpx.TimeoutException) else -1
        result["error"] = repr(exc)
    result["total_s"] = round(time.monotonic() - began, 3)
    return result


def served_model(pid: int) -> str | None:
    """The `--served-model-name` of the API server at or above ``pid`` in the process tree."""
    while pid > 1:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if "--served-model-name" in argv:
            return argv[argv.index("--served-model-name") + 1]
        pid = int(stat[stat.rfind(")") + 2 :].split()[1])
    return None


def gpu_mib_by_model() -> dict[str, float]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
    except FileNotFoundError:  # a dry run on a machine without a GPU
        return {}
    found: dict[str, float] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            model = served_model(int(parts[0])) or f"pid {parts[0]}"
            found[model] = found.get(model, 0.0) + float(parts[1])
    return found


def admin_state() -> dict[str, dict[str, Any]]:
    listing = httpx.get(f"{GATEWAY}/admin/models", headers=HEADERS, timeout=10).json()["data"]
    return {m["name"]: m for m in listing}


def race(models: list[str], clients: int, seconds: float) -> dict[str, Any]:
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < stop:
            outcome = first_token(rng.choice(models), max_tokens=8)
            with lock:
                results.append(outcome)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HUNG + seconds)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {
        "clients": clients,
        "seconds": seconds,
        "requests": len(results),
        "statuses": statuses,
        "slowest_s": max((r["total_s"] for r in results), default=None),
        "hung": sum(r["total_s"] >= HUNG for r in results),
        "still_running_threads": sum(t.is_alive() for t in threads),
    }


def run(
    a: str, b: str, alternations: int, race_s: float, level1_rounds: int, save: Path
) -> dict[str, Any]:
    """Each stage is saved as soon as it is done: a run cut short still leaves its numbers."""
    doc: dict[str, Any] = {"models": [a, b], "before": gpu_mib_by_model()}
    doc["sleep_level"] = admin_state()[a].get("sleep_level")
    doc["cold"] = [first_token(a), first_token(b)]  # b's start puts a to sleep
    doc["after_cold"] = {"gpu_mib": gpu_mib_by_model(), "admin": admin_state()}
    save.write_text(json.dumps(doc, indent=1))
    swaps: list[dict[str, Any]] = []
    doc["alternating"] = swaps
    for i in range(alternations):
        model = a if i % 2 == 0 else b
        outcome = first_token(model)
        outcome["gpu_mib"] = gpu_mib_by_model()
        swaps.append(outcome)
        save.write_text(json.dumps(doc, indent=1))
    doc["race"] = race([a, b], 16, race_s)
    save.write_text(json.dumps(doc, indent=1))
    rounds: list[dict[str, Any]] = []
    doc["level1"] = rounds
    for _ in range(level1_rounds):
        httpx.post(f"{GATEWAY}/admin/models/{a}/load", headers=HEADERS, timeout=HUNG)
        awake = gpu_mib_by_model()
        began = time.monotonic()
        slept = httpx.post(
            f"{GATEWAY}/admin/models/{a}/sleep", params={"level": 1}, headers=HEADERS, timeout=HUNG
        )
        sleep_s = time.monotonic() - began
        asleep = gpu_mib_by_model()
        woke = first_token(a)
        rounds.append(
            {
                "sleep_status": slept.status_code,
                "sleep_s": round(sleep_s, 3),
                "gpu_mib_awake": awake,
                "gpu_mib_asleep": asleep,
                "wake_request": woke,
                "last_wake_s": admin_state()[a].get("last_wake_s"),
            }
        )
        save.write_text(json.dumps(doc, indent=1))
    doc["admin"] = admin_state()
    doc["metrics"] = [
        line
        for line in httpx.get(f"{GATEWAY}/metrics", headers=HEADERS, timeout=10).text.splitlines()
        if line.startswith("vllm_gateway_model_") and not line.startswith("#")
    ]
    save.write_text(json.dumps(doc, indent=1))
    return doc


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def report(doc: dict[str, Any]) -> str:
    a, b = doc["models"]
    level = doc.get("sleep_level", 2)
    cold = [c.get("ttft_s") for c in doc["cold"]]
    swaps = doc.get("alternating", [])
    errors = sum(s["status"] != 200 for s in swaps)
    ttft = [s["ttft_s"] for s in swaps if "ttft_s" in s]
    waits = [s["start_wait_s"] for s in swaps if "start_wait_s" in s]
    awake_mib = max((m for s in swaps for m in s["gpu_mib"].values()), default=0.0)
    asleep_mib = [
        min(s["gpu_mib"].get(a, 0.0), s["gpu_mib"].get(b, 0.0))
        for s in swaps
        if a in s["gpu_mib"] and b in s["gpu_mib"]
    ]
    released = (1 - max(asleep_mib) / awake_mib) if asleep_mib and awake_mib else None
    race_doc = doc.get(
        "race", {"seconds": 0, "requests": 0, "statuses": {}, "slowest_s": None, "hung": None}
    )
    lines = [
        f"## Sleep mode: two 7B-shape models that cannot share GPU 0 (0.6 each), level {level} "
        "swaps",
        "",
        "Measured by `load/gpu_check.sh sleep` (`load/gpu_sleep.py`), gateway spawn mode, "
        f"`unload: sleep`, `sleep_level: {level}`.",
        "",
        f"- Cold start to first token: {a} {cold[0]} s, {b} {cold[1]} s (the second one also "
        f"put {a} to sleep).",
        f"- {len(swaps)} alternating requests, each a swap (one falls asleep, the other wakes): "
        f"{errors} errors; time to first token p50 {_p50(ttft)} s, max "
        f"{max(ttft) if ttft else None} s; gateway start wait p50 {_p50(waits)} s.",
        f"- GPU memory: an awake server held up to {awake_mib / 1024:.1f} GiB; asleep, at most "
        f"{max(asleep_mib) / 1024 if asleep_mib else float('nan'):.2f} GiB "
        f"({released:.1%} of it released)."
        if released is not None
        else "- GPU memory: n/a",
        f"- 16 clients racing the swaps for {race_doc['seconds']:g} s: "
        f"{race_doc['requests']} requests, statuses {race_doc['statuses']}, slowest "
        f"{race_doc['slowest_s']} s, hung {race_doc['hung']}.",
    ]
    for i, r in enumerate(doc.get("level1", []), 1):
        asleep = r["gpu_mib_asleep"].get(a)
        lines.append(
            f"- Level 1, round {i}: fell asleep in {r['sleep_s']} s (admin sleep, status "
            f"{r['sleep_status']}; {a} then held {asleep} MiB), woke in {r['last_wake_s']} s, "
            f"first token {r['wake_request'].get('ttft_s')} s after the request."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="step", required=True)
    run_p = sub.add_parser("run")
    run_p.add_argument("a")
    run_p.add_argument("b")
    run_p.add_argument("--alternations", type=int, default=20)
    run_p.add_argument("--race", type=float, default=60)
    run_p.add_argument("--level1-rounds", type=int, default=3)
    run_p.add_argument("--save", type=Path, required=True, help="the JSON document, per stage")
    sub.add_parser("report").add_argument("file")
    args = parser.parse_args()
    if args.step == "run":
        run(args.a, args.b, args.alternations, args.race, args.level1_rounds, args.save)
    else:
        sys.stdout.write(report(json.loads(Path(args.file).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
