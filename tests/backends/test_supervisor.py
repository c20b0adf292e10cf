"""The supervisor against the fake vLLM, spawned exactly as a real one would be.

Real vLLM goes through the same paths in tests/integration/test_spawn.py; here the faults are
quick to provoke and the timings short.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from backends.lifecycle import BackendState
from backends.spec import VllmSpec
from backends.supervisor import SpawnHealth, Supervisor, SupervisorTimings
from tests.helpers import until
from tests.servers import FAKE_VLLM, alive, descendants

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

FAST = SupervisorTimings(
    poll_interval=0.05,
    health=SpawnHealth(interval=0.1, timeout=0.3, failures=2),
    backoff_base=0.05,
    backoff_cap=0.2,
    max_restarts=2,
    stop_grace=2,
    progress_interval=60,
)


def fake_spec(name: str = "m", **env: str) -> VllmSpec:
    return VllmSpec(name=name, model="fake", launcher=(sys.executable, FAKE_VLLM), env=env)


@pytest.fixture
async def supervisor(tmp_path: Path) -> AsyncIterator[Supervisor]:
    sup = Supervisor([fake_spec()], log_dir=tmp_path, timings=FAST)
    await sup.start()
    yield sup
    await sup.stop()


async def test_backend_becomes_ready_and_answers_with_its_own_key(supervisor: Supervisor) -> None:
    replica = supervisor.replicas("m")[0]
    await until(lambda: replica.state is BackendState.READY)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{replica.url}/v1/models")).status_code == 401
        auth = {"Authorization": f"Bearer {replica.api_key}"}
        assert (await client.get(f"{replica.url}/v1/models", headers=auth)).status_code == 200


@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen-so-health-checks-fail"]
)
async def test_dead_or_silent_backend_is_restarted(supervisor: Supervisor, sig: int) -> None:
    """A killed server exits; a frozen one (SIGSTOP) lives on but fails its health checks.
    Either way a new one takes its place and the old one is gone."""
    backend = supervisor.backends["m"]
    await until(lambda: backend.replica.state is BackendState.READY)
    (server,) = descendants(backend.process.pid)
    os.kill(server, sig)
    await until(lambda: backend.replica.state is not BackendState.READY)
    await until(lambda: backend.replica.state is BackendState.READY)
    assert backend.replica.restarts == 1
    await until(lambda: not alive(server))


async def test_backend_that_cannot_start_is_failed_with_its_log(tmp_path: Path) -> None:
    sup = Supervisor([fake_spec(FAKE_VLLM_EXIT_AT_START="3")], log_dir=tmp_path, timings=FAST)
    await sup.start()
    try:
        await until(lambda: sup.backends["m"].replica.state is BackendState.FAILED)
        assert sup.backends["m"].replica.restarts == FAST.max_restarts
        assert (tmp_path / "m.log").read_text().count("starting:") == FAST.max_restarts + 1
    finally:
        await sup.stop()


async def test_stop_leaves_no_process(supervisor: Supervisor) -> None:
    backend = supervisor.backends["m"]
    await until(lambda: backend.replica.state is BackendState.READY)
    processes = {backend.process.pid, *descendants(backend.process.pid)}
    assert len(processes) == 2  # the reaper and the server
    await supervisor.stop()
    assert not any(alive(pid) for pid in processes)
    assert backend.replica.state is BackendState.STOPPED
