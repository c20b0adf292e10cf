"""Spawn mode with real vLLM: the gateway starts, restarts and stops its own servers."""

from __future__ import annotations

import signal

import pytest

from tests.integration.spawned import embed, ok, vllm_servers
from tests.servers import alive, descendants, wait_until
from tests.vllm_rig import READY_TIMEOUT, VllmRig

pytestmark = pytest.mark.vllm


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
