"""Talking to the rig's spawn-mode gateways, and finding the vLLM servers below them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import wait_until
from tests.servers import GatewayProcess, descendants
from tests.vllm_rig import ARTIFACTS, CPU_ARGS, MODELS_DIR, cpu_env

AUTH = {"Authorization": "Bearer sk-spawn"}


def chat(gw: GatewayProcess, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def embed(gw: GatewayProcess, model: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/embeddings", json={"model": model, "input": "hi"}, headers=AUTH, timeout=60
    )


def transcribe(gw: GatewayProcess, model: str) -> httpx.Response:
    from gateway.commands.tiny_media import wav

    files = {"file": ("tone.wav", wav(0.5), "audio/wav")}
    url = f"{gw.url}/v1/audio/transcriptions"
    return httpx.post(url, data={"model": model}, files=files, headers=AUTH, timeout=60)


def ok(call: object) -> bool:
    try:
        return call().status_code == 200  # type: ignore[operator]
    except httpx.HTTPError:
        return False


@contextmanager
def serving(
    config: dict[str, Any], answers: Callable[[GatewayProcess], httpx.Response], timeout: float
) -> Iterator[GatewayProcess]:
    """A gateway process of its own (a module's), once ``answers`` gets a 200 through it."""
    gw = GatewayProcess(config, ARTIFACTS)
    try:
        wait_until(lambda: ok(lambda: answers(gw)), timeout, "the gateway's model up")
        yield gw
    finally:
        gw.close()


def gauge(gw: GatewayProcess, path: str, name: str, key: str) -> float:
    """A gauge summed over its series: the gateway's own (`/metrics`) or a server's, relayed
    (`/backends/{model}/metrics`); ``key`` may read them."""
    headers = {"Authorization": f"Bearer {key}"}
    text = httpx.get(f"{gw.url}{path}", headers=headers, timeout=10).text
    lines = text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def vllm_servers(gw: GatewayProcess) -> list[int]:
    """The api_server processes below the gateway (not the reapers, not engine workers)."""
    return api_servers(gw.proc.pid)


def api_servers(pid: int) -> list[int]:
    """The vLLM api_server processes below ``pid``."""
    found = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmdline and b"backends.reaper" not in cmdline:
            found.append(child)
    return found


def tiny_chat(name: str, core: int, max_len: int) -> dict[str, object]:
    """A spawned tiny chat model, bound to one of the two cores."""
    return {
        "name": name,
        "vllm": {
            "model": str(MODELS_DIR / "chat"),
            "args": {**CPU_ARGS, "max-model-len": max_len},
            "env": cpu_env(core),
        },
    }
