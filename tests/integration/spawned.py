"""Talking to the rig's spawn-mode gateways, and finding the vLLM servers below them."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.servers import GatewayProcess, descendants

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
