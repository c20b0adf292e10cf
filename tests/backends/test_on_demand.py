"""On-demand models and swaps, with servers that start when the test says so.

The supervisor's side (real processes) is covered in tests/gateway/test_on_demand_spawn.py and,
with real vLLM, in tests/integration/test_on_demand.py.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from backends.lifecycle import BackendState
from backends.on_demand import (
    LoadFailed,
    ModelState,
    OnDemand,
    OnDemandModel,
    QueueFull,
    ShuttingDown,
    StartFailed,
)
from backends.pool import Replica
from backends.sleep_mode import SleepModeError
from backends.swaps import Switchboard, never_together

S = BackendState


class GatedServers:
    """Servers whose start ends when the test opens the model's gate (or fails it)."""

    def __init__(self) -> None:
        self._replicas: dict[str, list[Replica]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self.calls: list[str] = []
        self.insomniac: set[str] = set()  # answer /sleep but stay awake
        self.unwakeable: set[str] = set()

    def replicas(self, name: str) -> list[Replica]:
        return self._replicas.setdefault(name, [Replica(url=f"http://{name}", state=S.STOPPED)])

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def load(self, name: str) -> None:
        self.loads[name] += 1
        await self.gate(name).wait()
        if name in self.failing:
            raise LoadFailed(f"{name} exited with code 1: no such model")
        for replica in self.replicas(name):
            replica.move(S.LOADING)
            replica.move(S.READY)

    def drain(self, name: str) -> None:
        for replica in self.replicas(name):
            replica.move(S.DRAINING)

    async def unload(self, name: str) -> None:
        self.unloads[name] += 1
        for replica in self.replicas(name):
            replica.move(S.STOPPED)

    async def sleep(self, name: str, level: int) -> None:
        self.calls.append(f"sleep {name} {level}")
        if name in self.insomniac:
            raise SleepModeError(f"{name} answered /sleep but is awake")
        for replica in self.replicas(name):
            assert replica.in_flight == 0, "put to sleep with a request in flight"
            replica.move(S.SLEEPING)
            replica.move(S.ASLEEP)

    async def wake(self, name: str, level: int) -> None:
        self.calls.append(f"wake {name} {level}")
        if name in self.unwakeable:
            raise SleepModeError(f"{name} did not wake")
        for replica in self.replicas(name):
            replica.move(S.WAKING)
            replica.move(S.READY)


def board_of(
    servers: GatedServers, shares: dict[str, float], **config: float | str
) -> tuple[Switchboard, dict[str, OnDemandModel]]:
    """On-demand models that all live on GPU 0 with the given shares (0.01 while asleep)."""
    settings = OnDemand(**config)  # type: ignore[arg-type]
    models = {
        n: OnDemandModel(n, settings, servers, {0: s}, asleep_usage={0: 0.01})
        for n, s in shares.items()
    }
    return Switchboard(models.values()), models


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def test_concurrent_requests_share_one_start() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    waiters = [asyncio.create_task(models["a"].ready()) for _ in range(8)]
    await settle()
    assert models["a"].state is ModelState.STARTING and models["a"].waiting == 8
    servers.gate("a").set()
    waited = await asyncio.gather(*waiters)
    assert servers.loads["a"] == 1 and all(w > 0 for w in waited)
    assert models["a"].state is ModelState.READY and models["a"].waiting == 0
    assert await models["a"].ready() == 0.0  # a ready model does not wait


async def test_the_queue_is_bounded() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5}, max_waiting=2)
    waiters = [asyncio.create_task(models["a"].ready()) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as refused:
        await models["a"].ready()
    assert refused.value.retry_after > 0
    servers.gate("a").set()
    await asyncio.gather(*waiters)


async def test_a_client_that_leaves_leaves_the_queue_and_the_start_goes_on() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    waiter = asyncio.create_task(models["a"].ready())
    await settle()
    waiter.cancel()
    await settle()
    assert models["a"].waiting == 0 and models["a"].state is ModelState.STARTING
    servers.gate("a").set()
    await settle()
    assert models["a"].state is ModelState.READY


async def test_a_failed_start_refuses_every_waiting_request_and_backs_off() -> None:
    servers = GatedServers()
    servers.failing.add("a")
    _, models = board_of(servers, {"a": 0.5})
    waiters = [asyncio.create_task(models["a"].ready()) for _ in range(3)]
    await settle()
    servers.gate("a").set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, StartFailed) and "no such model" in str(r) for r in results)
    assert models["a"].state is ModelState.STOPPED and models["a"].not_before > 0
    assert results[0].retry_after >= 2  # type: ignore[union-attr]


async def test_a_start_past_start_timeout_is_stopped_and_refused() -> None:
    servers = GatedServers()  # the gate never opens
    _, models = board_of(servers, {"a": 0.5}, start_timeout=0.2)
    with pytest.raises(StartFailed, match="start_timeout"):
        await models["a"].ready()
    assert servers.unloads["a"] == 1 and models["a"].state is ModelState.STOPPED


async def test_idle_ttl_counts_from_the_end_of_the_last_request() -> None:
    servers = GatedServers()
    servers.gate("a").set()
    _, models = board_of(servers, {"a": 0.5}, idle_ttl=0.3)
    model = models["a"]
    await model.ready()
    replica = model.replicas[0]
    replica.in_flight = 1  # an open stream, longer than the TTL
    await asyncio.sleep(0.6)
    assert model.state is ModelState.READY
    replica.in_flight = 0
    replica.last_done = asyncio.get_running_loop().time()  # it ended now
    await asyncio.sleep(0.1)
    assert model.state is ModelState.READY  # not before the TTL
    await asyncio.sleep(0.5)
    assert model.state is ModelState.STOPPED and servers.unloads["a"] == 1


async def test_a_swap_unloads_the_least_recently_used_idle_model() -> None:
    servers = GatedServers()
    for name in "abc":
        servers.gate(name).set()
    _, models = board_of(servers, {"a": 0.4, "b": 0.4, "c": 0.4}, min_resident=0)
    await models["a"].ready()
    await models["b"].ready()
    await models["a"].ready()  # a was used last
    await models["c"].ready()
    assert models["b"].state is ModelState.STOPPED
    assert models["a"].state is ModelState.READY and models["c"].state is ModelState.READY


async def test_a_busy_model_stays_for_min_resident_then_is_drained() -> None:
    servers = GatedServers()
    servers.gate("a").set()
    servers.gate("b").set()
    _, models = board_of(
        servers, {"a": 0.6, "b": 0.6}, min_resident=0.5, drain_timeout=0.2, idle_ttl=60
    )
    await models["a"].ready()
    models["a"].replicas[0].in_flight = 1  # busy: only min_resident lets it go
    b = asyncio.create_task(models["b"].ready())
    await asyncio.sleep(0.3)
    assert not b.done() and models["a"].state is ModelState.READY
    await asyncio.wait_for(b, 2)
    assert models["a"].state is ModelState.STOPPED  # drained, then cut after drain_timeout
    assert models["b"].state is ModelState.READY


async def test_a_request_that_arrives_while_its_model_drains_waits_for_the_next_start() -> None:
    servers = GatedServers()
    servers.gate("a").set()
    _, models = board_of(servers, {"a": 0.5}, drain_timeout=5)
    model = models["a"]
    await model.ready()
    model.replicas[0].in_flight = 1
    unloading = model.unload("admin unload")
    await settle()
    assert model.state is ModelState.DRAINING
    late = asyncio.create_task(model.ready())
    await settle()
    assert not late.done()
    model.replicas[0].in_flight = 0
    await unloading
    assert await asyncio.wait_for(late, 2) > 0
    assert servers.loads["a"] == 2 and model.state is ModelState.READY


async def test_shutdown_refuses_the_waiting_requests_at_once() -> None:
    servers = GatedServers()
    board, models = board_of(servers, {"a": 0.5})
    waiter = asyncio.create_task(models["a"].ready())
    await settle()
    await board.close()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(waiter, 1)
    with pytest.raises(ShuttingDown):
        await models["a"].ready()


async def test_always_on_shares_count_and_pairs_that_never_fit_are_named() -> None:
    servers = GatedServers()
    models = {n: OnDemandModel(n, OnDemand(), servers, {0: 0.3}) for n in "ab"}
    board = Switchboard(models.values(), always_on={0: 0.5})
    assert board.swap_groups() == {0: [("a", "b")]}  # 0.5 + 0.3 + 0.3 > 0.95
    assert never_together({"a": {0: 0.3}, "b": {1: 0.9}}, {}) == {}


async def opened(servers: GatedServers, *names: str) -> GatedServers:
    for name in names:
        servers.gate(name).set()
    return servers


async def test_an_idle_sleep_mode_model_falls_asleep_and_a_request_wakes_it() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep", sleep_level=1, idle_ttl=0.2)
    model = models["a"]
    await model.ready()
    await asyncio.sleep(0.5)
    assert model.state is ModelState.ASLEEP and model.replicas[0].state is S.ASLEEP
    assert servers.calls == ["sleep a 1"] and servers.unloads["a"] == 0  # the process lives
    assert await model.ready() > 0
    assert servers.calls == ["sleep a 1", "wake a 1"] and servers.loads["a"] == 1
    assert (model.sleeps, model.wakes, model.state) == (1, 1, ModelState.READY)


async def test_a_swap_puts_the_other_model_to_sleep_and_counts_only_its_context() -> None:
    servers = await opened(GatedServers(), "a", "b")
    board, models = board_of(
        servers, {"a": 0.6, "b": 0.6}, unload="sleep", sleep_level=2, min_resident=0
    )
    await models["a"].ready()
    await models["b"].ready()
    assert servers.calls == ["sleep a 2"]
    assert models["a"].state is ModelState.ASLEEP and board.held() == {0: 0.61}
    await models["a"].ready()  # and back: b sleeps, a wakes with the level it slept at
    assert servers.calls == ["sleep a 2", "sleep b 2", "wake a 2"]


async def test_a_model_with_requests_in_flight_is_drained_before_it_sleeps() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep", drain_timeout=5)
    model = models["a"]
    await model.ready()
    model.replicas[0].in_flight = 1
    sleeping = model.unload("admin sleep")
    await asyncio.sleep(0.3)
    assert model.state is ModelState.DRAINING and servers.calls == []
    model.replicas[0].in_flight = 0
    await sleeping
    assert model.state is ModelState.ASLEEP and servers.calls == ["sleep a 1"]


async def test_requests_still_in_flight_after_drain_timeout_mean_a_stop_not_a_sleep() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep", drain_timeout=0.2)
    model = models["a"]
    await model.ready()
    model.replicas[0].in_flight = 1
    await model.unload("admin sleep")
    assert model.state is ModelState.STOPPED and servers.calls == []


async def test_a_server_that_does_not_fall_asleep_is_stopped() -> None:
    servers = await opened(GatedServers(), "a")
    servers.insomniac.add("a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep")
    await models["a"].ready()
    await models["a"].unload("idle")
    assert models["a"].state is ModelState.STOPPED and servers.unloads["a"] == 1


async def test_a_failed_wake_restarts_the_servers_and_the_request_still_gets_through() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep")
    model = models["a"]
    await model.ready()
    await model.unload("idle")
    servers.unwakeable.add("a")
    assert await model.ready() > 0
    assert servers.calls[-1] == "wake a 1" and servers.loads["a"] == 2
    assert model.state is ModelState.READY and (model.wakes, model.loads) == (0, 2)
