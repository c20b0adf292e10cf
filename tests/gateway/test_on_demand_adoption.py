"""A gateway restart with on-demand models (`keep_backends`): what serves is adopted serving,
what sleeps is adopted asleep and wakes on its next request, all without a start. The fake
vLLM's sleep mode stands in for vLLM's (its CPU build has none); real vLLM adopts a running
on-demand model in tests/integration/test_restart.py."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backends import adoption
from backends.state_dir import StateDir
from backends.supervisor import Supervisor
from gateway.specs import backend_specs, on_demand_names
from tests.gateway.test_on_demand_spawn import KEYS, on_demand_model
from tests.gateway.test_sleep_spawn import SleepGateway, sleeper
from tests.helpers import FAST_SPAWN
from tests.servers import FAKE_VLLM, GatewayServer, alive, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback


def on_gpu_1(model: dict[str, Any]) -> dict[str, Any]:
    model["vllm"]["gpus"] = [1]  # beside the other, not swapped with it
    return model


MODELS = [sleeper("sleepy", level=1, idle_ttl=30), on_gpu_1(on_demand_model("busy", idle_ttl=30))]


class KeepingGateway(SleepGateway):
    """A gateway that leaves its servers for the next one (`keep_backends`) in ``state``."""

    def __init__(self, tmp_path: Path, models: list[dict[str, Any]]) -> None:
        settings = gateway_settings(
            models, launcher=[sys.executable, FAKE_VLLM], log_dir=str(tmp_path), api_keys=KEYS
        )
        self.supervisor = Supervisor(
            backend_specs(settings),
            log_dir=tmp_path,
            timings=FAST_SPAWN,
            on_demand=on_demand_names(settings),
            state_dir=StateDir(tmp_path / "state"),
            keep_backends=30,
        )
        self.server = GatewayServer(settings, supervisor=self.supervisor)
        self.url = self.server.url


@pytest.fixture
def restarted(tmp_path: Path) -> Iterator[tuple[KeepingGateway, dict[str, int | None]]]:
    """A gateway that served "busy" and put "sleepy" to sleep (at level 2, not its configured
    1: only the recorded level wakes it right), stopped; then the next one, and the first
    one's server pids."""
    first = KeepingGateway(tmp_path, MODELS)
    assert first.chat("busy").status_code == 200
    assert first.chat("sleepy").status_code == 200
    assert first.admin("POST", "/models/sleepy/sleep?level=2").json()["state"] == "asleep"
    pids = {name: first.pid(name) for name in ("busy", "sleepy")}
    first.server.close()
    assert all(pid is not None and alive(pid) for pid in pids.values())  # left running
    second = KeepingGateway(tmp_path, MODELS)
    yield second, pids
    second.server.close()
    for record in StateDir(tmp_path / "state").records():
        asyncio.run(adoption.end_recorded(record, 2))


def test_a_serving_on_demand_model_is_adopted_ready_and_answers_without_a_start(
    restarted: tuple[KeepingGateway, dict[str, int | None]],
) -> None:
    gateway, pids = restarted
    assert gateway.state("busy") == "ready" and gateway.pid("busy") == pids["busy"]
    answer = gateway.chat("busy")
    assert answer.status_code == 200 and "x-vllm-gateway-start-wait" not in answer.headers
    assert gateway.metric('vllm_gateway_model_loads_total{model="busy"}') == 0


def test_a_sleeping_model_is_adopted_asleep_and_its_next_request_wakes_it_at_its_level(
    restarted: tuple[KeepingGateway, dict[str, int | None]],
) -> None:
    gateway, pids = restarted
    assert gateway.state("sleepy") == "asleep" and gateway.pid("sleepy") == pids["sleepy"]
    assert gateway.stats("sleepy")["sleeps"] == 1  # not woken by the adoption
    woken = gateway.chat("sleepy")
    assert woken.status_code == 200 and "x-vllm-gateway-start-wait" in woken.headers
    assert gateway.pid("sleepy") == pids["sleepy"]  # woken, not started
    stats = gateway.stats("sleepy")
    assert (stats["wakes"], stats["violations"]) == (
        1,
        0,
    )  # woken as level 2 wants: weights reloaded
    assert gateway.metric('vllm_gateway_model_wakes_total{model="sleepy"}') == 1
