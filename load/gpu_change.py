"""Change without downtime on the GPU (issue 29): a reload that restarts one model, then a
gateway restart that adopts every server. Run by `load/gpu_check.sh change` on the GPU machine.

    python3 load/gpu_change.py MODEL_DIR STATE_DIR --save FILE.json

The layout: two always-on 7B-shape models sharing GPU 0 (`chat-a`, `chat-b`) and an on-demand
one that sleeps there (`sleep-a`, vLLM's sleep mode). Steps, each recorded:

1. start: the gateway spawns chat-a and chat-b (in turn); a request starts sleep-a, an admin
   sleep (`POST /admin/models/sleep-a/sleep`) puts it to sleep.
2. reload: chat-a's `max-model-len` changes in the file and `POST /admin/reload` applies it,
   while one client loop asks chat-a and another chat-b: chat-a's server restarts (its requests
   held, not refused), chat-b's and sleep-a's processes and chat-b's KV cache stay the same.
3. restart: SIGTERM to the gateway (`keep_backends`), a new gateway on the same file: the time
   to the first answer of each always-on model, the same processes, sleep-a adopted asleep and
   woken by its next request.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from gpu_steps import GATEWAY, HEADERS, complete, gpu_memory, processes, status

SHARES = {"chat-a": 0.25, "chat-b": 0.25, "sleep-a": 0.35}


def config(model: str, state: Path, chat_a_len: int) -> str:
    lines = [
        "host: 127.0.0.1",
        "port: 8000",
        "api_keys: [{name: ops, key: sk-gpu-check, admin: true}]",
        "launcher: [python3, -m, vllm.entrypoints.openai.api_server]",
        f"log_dir: {state}/logs",
        f"state_dir: {state}/kept",
        "keep_backends: 300",
        "models:",
    ]
    for name, share in SHARES.items():
        length = chat_a_len if name == "chat-a" else 4096
        lines += [
            f"  - name: {name}",
            "    vllm:",
            f"      model: {model}",
            "      gpus: [0]",
            f"      args: {{gpu-memory-utilization: {share}, enforce-eager: true, "
            f"dtype: bfloat16, max-model-len: {length}}}",
        ]
        if name == "sleep-a":
            lines.append(
                "    on_demand: {idle_ttl: 3600, min_resident: 0, start_timeout: 600, "
                "unload: sleep, sleep_level: 2}"
            )
    return "\n".join(lines) + "\n"


class Gateway:
    def __init__(self, file: Path, log: Path) -> None:
        self.proc = subprocess.Popen(
            ["python3", "-m", "gateway", "serve", "--config", str(file)],
            stdout=open(log, "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.began = time.monotonic()

    def stop(self) -> float:
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        return round(time.monotonic() - began, 2)


def model_states() -> dict[str, dict[str, Any]]:
    found = {}
    for m in status()["models"]:
        od = m.get("on_demand") or {}
        found[m["name"]] = {
            "state": od.get("state") or ("ready" if m["ready"] else "not ready"),
            "replicas": [r["state"] for r in m["replicas"]],
            "kv_cache": [r["kv_cache"] for r in m["replicas"]],
        }
    return found


def until(what: str, check: Any, timeout: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if check():
                return round(time.monotonic() - began, 2)
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        time.sleep(0.25)
    raise SystemExit(f"{what}: not within {timeout} s")


def pids() -> dict[str, int | None]:
    return {name: processes(name).get("server") for name in SHARES}


class Loop(threading.Thread):
    """Completions to one model, one after another, until stopped: every status counted."""

    def __init__(self, model: str) -> None:
        super().__init__(daemon=True)
        self.model, self.statuses, self.stopping = model, Counter[int](), threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.statuses[complete(self.model, max_tokens=4)] += 1

    def stop(self) -> dict[str, int]:
        self.stopping.set()
        self.join(120)
        return {str(k): v for k, v in self.statuses.items()}


def first_answer(model: str, timeout: float) -> float:
    return until(f"{model} answers", lambda: complete(model, 4) == 200, timeout)


def run(model: str, state: Path, save: Path) -> dict[str, Any]:
    state.mkdir(parents=True, exist_ok=True)
    file, log = state / "change.yaml", state / "change-gateway.log"
    file.write_text(config(model, state, 4096))
    doc: dict[str, Any] = {"shares": SHARES}

    def saved(key: str, value: Any) -> None:
        doc[key] = value
        save.write_text(json.dumps(doc, indent=1))

    gw = Gateway(file, log)
    ready = lambda: all(  # noqa: E731
        model_states()[m]["replicas"] == ["ready"] for m in ("chat-a", "chat-b")
    )
    saved("start_ready_s", until("chat-a and chat-b ready", ready, 540))
    saved("sleep_a_cold_start_s", first_answer("sleep-a", 400))
    admin = httpx.post(f"{GATEWAY}/admin/models/sleep-a/sleep", headers=HEADERS, timeout=120)
    asleep = lambda: model_states()["sleep-a"]["state"] == "asleep"  # noqa: E731
    saved("sleep_a_fell_asleep_s", {"admin": admin.status_code, "s": until("asleep", asleep, 120)})
    before: dict[str, Any] = {"pids": pids(), "models": model_states(), "gpu": gpu_memory()}
    saved("before", before)

    file.write_text(config(model, state, 2048))  # chat-a's command changes; nothing else
    loops = {m: Loop(m) for m in ("chat-a", "chat-b")}
    for loop in loops.values():
        loop.start()
    began = time.monotonic()
    reload = httpx.post(f"{GATEWAY}/admin/reload", headers=HEADERS, timeout=600)
    changed = lambda: pids()["chat-a"] not in (None, before["pids"]["chat-a"]) and ready()  # noqa: E731
    restarted_s = until("chat-a back", changed, 540)
    time.sleep(2)  # a few answers from the new chat-a
    after = {"pids": pids(), "models": model_states(), "gpu": gpu_memory()}
    saved(
        "reload",
        {
            "status": reload.status_code,
            "answer": reload.json(),
            "answered_after_s": round(time.monotonic() - began, 2),
            "chat_a_back_s": restarted_s,
            "loops": {m: loop.stop() for m, loop in loops.items()},
            "after": after,
        },
    )

    stopped_in = gw.stop()
    left = pids()
    gw = Gateway(file, log)
    firsts = {m: first_answer(m, 120) for m in ("chat-a", "chat-b")}
    adopted: dict[str, Any] = {"pids": pids(), "models": model_states()}
    sleep_state = adopted["models"]["sleep-a"]["state"]
    woke_s = first_answer("sleep-a", 300)
    saved(
        "restart",
        {
            "sigterm_to_exit_s": stopped_in,
            "pids_left_running": left,
            "first_answer_s": firsts,
            "adopted": adopted,
            "sleep_a_state_after_restart": sleep_state,
            "sleep_a_first_answer_s": woke_s,
            "pids_after_wake": pids(),
        },
    )
    gw.stop()
    subprocess.run(
        ["python3", "-m", "gateway", "stop-backends", "--config", str(file)],
        check=False,
        timeout=120,
    )
    saved("stopped_backends", {"pids_left": pids()})
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("state", type=Path)
    parser.add_argument("--save", type=Path, required=True)
    args = parser.parse_args()
    os.chdir(Path(__file__).resolve().parent.parent)
    run(str(args.model), args.state, args.save)


if __name__ == "__main__":
    main()
