"""Spawn mode with real vLLM: the gateway starts, restarts and stops its own servers."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration.spawned import AUTH, chat, ok, transcribe, vllm_servers
from tests.servers import alive, descendants
from tests.vllm_rig import READY_TIMEOUT, VllmRig

pytestmark = pytest.mark.vllm


def test_each_spawned_server_got_the_kv_cache_its_slice_gives(rig: VllmRig) -> None:
    """On the CPU build the slice is VLLM_CPU_KVCACHE_SPACE (1 GiB here): what vLLM reports
    must match what the gateway expects, and both show in /status.json and /metrics."""
    gw = rig.spawned["mixed"]
    wait_until(lambda: ok(lambda: chat(gw, "spawned-chat")), READY_TIMEOUT, "spawned-chat", every=1)
    doc = httpx.get(f"{gw.url}/status.json", headers=AUTH, timeout=10).json()
    (model,) = [m for m in doc["models"] if m["name"] == "spawned-chat"]
    for replica in model["replicas"]:
        kv = replica["kv_cache"]
        assert kv["expected_gib"] == 1.0
        assert kv["expected_tokens"] == 2**30 // (2 * 2 * 2 * 64 * 4)  # layers, heads, dim, fp32
        assert abs(kv["actual_tokens"] - kv["expected_tokens"]) <= 0.1 * kv["expected_tokens"]
        assert kv["short"] is False
    metrics = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10).text
    assert 'vllm_gateway_kv_cache_tokens{kind="actual",model="spawned-chat",replica="0"}' in (
        metrics
    )
    (embedder,) = [m for m in doc["models"] if m["name"] == "tiny-embed"]
    assert embedder["replicas"][0]["kv_cache"] is None  # connect mode: not the gateway's slice


def test_sigterm_to_gateway_stops_every_vllm_process(rig: VllmRig) -> None:
    gw = rig.spawned["mixed"]
    family = descendants(gw.proc.pid)
    assert vllm_servers(gw)
    gw.proc.send_signal(signal.SIGTERM)
    gw.proc.wait(120)
    wait_until(lambda: not any(alive(p) for p in family), 60, "every vLLM process to end")


def test_sigkill_to_gateway_stops_every_vllm_process(rig: VllmRig) -> None:
    """The speech gateway (test_media.py is done with it)."""
    gw = rig.spawned["speech"]
    wait_until(
        lambda: ok(lambda: transcribe(gw, "tiny-whisper")), READY_TIMEOUT, "whisper", every=1
    )
    family = descendants(gw.proc.pid)
    assert len(vllm_servers(gw)) == 1 and len(family) >= 3  # reaper, server, engine core
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait(30)
    wait_until(lambda: not any(alive(p) for p in family), 60, "every vLLM process to end")
