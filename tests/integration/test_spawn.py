"""Spawn mode with real vLLM: the gateway starts, restarts and stops its own servers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import GatewayProcess, alive, descendants, wait_until
from tests.vllm_rig import READY_TIMEOUT, VllmRig

pytestmark = pytest.mark.vllm
AUTH = {"Authorization": "Bearer sk-spawn"}


def chat(gw: GatewayProcess, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def embed(gw: GatewayProcess, model: str) -> httpx.Response:
    return httpx.post(
        f"{gw.url}/v1/embeddings", json={"model": model, "input": "hi"}, headers=AUTH, timeout=60
    )


def ok(call: object) -> bool:
    try:
        return call().status_code == 200  # type: ignore[operator]
    except httpx.HTTPError:
        return False


def vllm_servers(gw: GatewayProcess) -> list[int]:
    """The api_server processes below the gateway (not the reapers, not engine workers)."""
    found = []
    for pid in descendants(gw.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in cmdline and b"backends.reaper" not in cmdline:
            found.append(pid)
    return found


def test_spawned_model_serves_then_survives_kill_9(rig: VllmRig) -> None:
    gw = rig.spawned["mixed"]
    wait_until(lambda: ok(lambda: chat(gw, "sc")), READY_TIMEOUT, "the spawned chat model", every=1)
    assert chat(gw, "sc").json()["model"] == "spawned-chat"
    assert embed(gw, "tiny-embed").status_code == 200  # the connect-mode model of the same config

    (server,) = vllm_servers(gw)
    os.kill(server, signal.SIGKILL)
    statuses, others = [], []
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        response = chat(gw, "spawned-chat")
        statuses.append(response.status_code)
        if len(statuses) % 5 == 1:  # sparingly: a CPU vLLM worker spins after each request
            others.append(embed(gw, "tiny-embed").status_code)
        if response.status_code == 200 and 503 in statuses:
            break
        if response.status_code == 503:
            assert response.json()["error"]["code"] in ("backend_loading", "backend_unavailable")
            assert "retry-after" in response.headers
        time.sleep(1)
    assert 503 in statuses and statuses[-1] == 200, statuses
    assert set(statuses) <= {200, 503}, statuses  # never a 500 or a hang
    assert set(others) == {200}, "the other model kept answering throughout"
    assert not alive(server)


def test_sigterm_to_gateway_stops_every_vllm_process(rig: VllmRig) -> None:
    gw = rig.spawned["mixed"]
    family = descendants(gw.proc.pid)
    assert vllm_servers(gw)
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(120)
    wait_until(lambda: not any(alive(p) for p in family), 60, "every vLLM process to end")


def test_sigkill_to_gateway_stops_every_vllm_process(rig: VllmRig) -> None:
    gw = rig.spawned["doomed"]
    wait_until(
        lambda: ok(lambda: embed(gw, "doomed-embed")), READY_TIMEOUT, "doomed-embed", every=1
    )
    family = descendants(gw.proc.pid)
    assert len(vllm_servers(gw)) == 1 and len(family) >= 3  # reaper, server, engine core
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in family), 60, "every vLLM process to end")
