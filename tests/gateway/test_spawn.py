"""Spawn mode through the gateway, with the fake vLLM as the launcher (real vLLM: integration)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from backends.supervisor import Supervisor
from gateway.specs import backend_specs
from tests.helpers import FAST_SPAWN
from tests.servers import (
    FAKE_VLLM,
    GatewayProcess,
    GatewayServer,
    alive,
    descendants,
    gateway_settings,
    wait_until,
)

pytestmark = pytest.mark.servers  # starts processes or servers on loopback


def spawn_model(name: str, **args: object) -> dict:
    return {"name": name, "vllm": {"model": "fake", "args": args}}


def test_a_loading_model_answers_503_with_retry_after_then_serves(tmp_path: Path) -> None:
    settings = gateway_settings(
        [spawn_model("slow", **{"startup-delay": 1.5})],
        launcher=[sys.executable, FAKE_VLLM],
        log_dir=str(tmp_path),
    )
    supervisor = Supervisor(backend_specs(settings), log_dir=tmp_path, timings=FAST_SPAWN)
    gateway = GatewayServer(settings, supervisor=supervisor)
    try:
        request = {"model": "slow", "messages": []}
        early = httpx.post(f"{gateway.url}/v1/chat/completions", json=request)
        assert early.status_code == 503
        assert early.json()["error"]["code"] == "backend_loading"
        assert "loading" in early.json()["error"]["message"]
        assert int(early.headers["retry-after"]) > 0
        wait_until(
            lambda: (
                httpx.post(f"{gateway.url}/v1/chat/completions", json=request).status_code == 200
            ),
            15,
            "the model to load",
        )
    finally:
        gateway.close()
    assert (tmp_path / "slow.log").exists()


@pytest.fixture
def gateway_process(tmp_path: Path):
    config = {
        "launcher": [sys.executable, FAKE_VLLM],
        "log_dir": str(tmp_path / "logs"),
        "models": [spawn_model("a"), spawn_model("b")],
    }
    gateway = GatewayProcess(config, tmp_path)
    url, proc = gateway.url, gateway.proc

    def both_ready() -> bool:
        try:
            return all(
                httpx.post(f"{url}/v1/chat/completions", json={"model": m}).status_code == 200
                for m in ("a", "b")
            )
        except httpx.HTTPError:
            return False

    wait_until(both_ready, 30, "both spawned backends")
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_no_backend_process_outlives_the_gateway(
    gateway_process: subprocess.Popen, sig: int
) -> None:
    family = descendants(gateway_process.pid)
    assert len(family) >= 4  # a reaper and a server per model
    os.kill(gateway_process.pid, sig)
    gateway_process.wait(30)
    wait_until(lambda: not any(alive(pid) for pid in family), 20, "every backend process to end")
