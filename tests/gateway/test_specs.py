"""From the config to the health checks: each mode's `health` settings are honoured, and
unset fields take that mode's own defaults."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backends.errors import QueueFull
from backends.health import HealthPolicy
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Replica
from backends.supervisor import SpawnHealth, Supervisor
from gateway.specs import backend_specs, spawn_health, switchboard
from gateway.traffic.admission import queue_limits
from tests.helpers import until
from tests.servers import gateway_settings

SPAWN = {"model": "/models/m"}


def test_fields_a_config_sets_apply_and_the_rest_keep_spawn_defaults(tmp_path: Path) -> None:
    settings = gateway_settings(
        [
            {"name": "tuned", "vllm": SPAWN, "health": {"interval": 1, "unhealthy_threshold": 5}},
            {"name": "default", "vllm": SPAWN},
            {"name": "connected", "url": "http://127.0.0.1:9", "health": {"interval": 1}},
        ]
    )
    found = spawn_health(settings)
    assert found == {
        "tuned": SpawnHealth(interval=1.0, timeout=5.0, failures=5),
        "default": SpawnHealth(),  # 5 s, 5 s, 3 failures: spawn mode's own defaults
    }
    supervisor = Supervisor(backend_specs(settings), log_dir=tmp_path, health=found)
    assert supervisor.backends["tuned"].health == SpawnHealth(1.0, 5.0, 5)
    assert supervisor.backends["default"].health == SpawnHealth()


def test_connect_mode_has_its_own_defaults_and_takes_what_the_config_sets() -> None:
    settings = gateway_settings(
        [
            {"name": "plain", "url": "http://127.0.0.1:9"},
            {"name": "tuned", "url": "http://127.0.0.1:9", "health": {"timeout": 7}},
        ]
    )
    plain, tuned = (m.health.policy() for m in settings.models)
    assert plain == HealthPolicy()  # 5 s, 2 s, 2 and 2 checks
    assert tuned == HealthPolicy(timeout=7.0)


async def test_a_full_start_queue_answers_the_configured_retry_after() -> None:
    settings = gateway_settings(
        [{"name": "od", "vllm": SPAWN, "on_demand": {"max_waiting": 1}}],
        retry_after={"loading": 7},
    )
    board = switchboard(settings, NeverReady())
    model = board.models["od"]
    model.queue.configure(queue_limits(settings.models[0], settings))  # the old option's bound
    held = asyncio.create_task(model.queue.admit(bring_up=model.ready))
    await until(lambda: model.waiting == 1, what="the first request held")
    with pytest.raises(QueueFull) as refused:
        await model.queue.admit(bring_up=model.ready)
    assert refused.value.retry_after == 7
    await board.close()  # the gateway stops: the held request is refused, the start ends
    assert isinstance((await asyncio.gather(held, return_exceptions=True))[0], Exception)


class NeverReady:
    """Servers whose start never ends: requests stay held."""

    def __init__(self) -> None:
        self._lives: dict[str, ModelLife] = {}

    def life(self, name: str) -> ModelLife:
        replica = Replica(url="", state=BackendState.STOPPED)
        return self._lives.setdefault(name, ModelLife(name, [replica], on_demand=True))

    async def load(self, name: str) -> None:
        await asyncio.Event().wait()

    async def drain(self, name: str) -> None: ...

    async def unload(self, name: str) -> None: ...

    async def sleep(self, name: str, level: int) -> int:
        return 0

    async def wake(self, name: str, level: int) -> None: ...
