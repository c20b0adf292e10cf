"""On-demand models and swaps, with servers that start when the test says so.

The supervisor's side (real processes) is covered in tests/gateway/test_on_demand_spawn.py and,
with real vLLM, in tests/integration/test_on_demand.py.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections import Counter

import pytest

from backends.errors import LoadFailed, QueueFull, ShuttingDown, SleepModeError, StartFailed
from backends.kept import Resumed
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel
from backends.on_demand_api import OnDemand
from backends.pool import Lease, Replica, ReplicaPool
from backends.queues import QueueLimits, Slot
from backends.swaps import Switchboard, never_together

S = BackendState


class GatedServers:
    """Servers whose start ends when the test opens the model's gate (or fails it). Like the
    supervisor, they ask each model's life for every move."""

    def __init__(self) -> None:
        self.lives: dict[str, ModelLife] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()
        self.loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self.calls: list[str] = []
        self.insomniac: set[str] = set()  # answer /sleep but stay awake
        self.unwakeable: set[str] = set()

    def life(self, name: str) -> ModelLife:
        if name not in self.lives:
            replica = Replica(url=f"http://{name}", state=S.STOPPED, gpus=(0,))
            self.lives[name] = ModelLife(name, [replica], on_demand=True)
        return self.lives[name]

    def replicas(self, name: str) -> list[Replica]:
        return self.life(name).replicas

    def gate(self, name: str) -> asyncio.Event:
        return self.gates.setdefault(name, asyncio.Event())

    async def load(self, name: str) -> None:
        self.loads[name] += 1
        await self.gate(name).wait()
        if name in self.failing:
            raise LoadFailed(f"{name} exited with code 1: no such model")
        for replica in self.replicas(name):
            await self.life(name).move(S.LOADING, replica)
            await self.life(name).move(S.READY, replica)

    async def drain(self, name: str) -> None:
        for replica in self.replicas(name):
            await self.life(name).move(S.DRAINING, replica, expected={S.READY})

    async def unload(self, name: str) -> None:
        self.unloads[name] += 1
        for replica in self.replicas(name):
            await self.life(name).move(S.STOPPED, replica)

    async def sleep(self, name: str, level: int) -> int:
        self.calls.append(f"sleep {name} {level}")
        if name in self.insomniac:
            raise SleepModeError(f"{name} answered /sleep but is awake")
        asleep = 0
        for replica in self.replicas(name):
            assert replica.in_flight == 0, "put to sleep with a request in flight"
            if await self.life(name).move(S.SLEEPING, replica, expected={S.DRAINING}) is S.SLEEPING:
                asleep += await self.life(name).move(S.ASLEEP, replica) is S.ASLEEP
        return asleep

    async def wake(self, name: str, level: int) -> None:
        self.calls.append(f"wake {name} {level}")
        if name in self.unwakeable:
            raise SleepModeError(f"{name} did not wake")
        for replica in self.replicas(name):
            await self.life(name).move(S.WAKING, replica)
            await self.life(name).move(S.READY, replica)


def board_of(
    servers: GatedServers, shares: dict[str, float], **config: float | str
) -> tuple[Switchboard, dict[str, OnDemandModel]]:
    """On-demand models that all live on GPU 0 with the given shares (0.01 while asleep)."""
    settings = OnDemand(**config)  # type: ignore[arg-type]
    for name, share in shares.items():
        for replica in servers.replicas(name):
            replica.share = share
    models = {n: OnDemandModel(n, settings, servers, asleep_share=0.01) for n in shares}
    return Switchboard(models.values()), models


def hold(model: OnDemandModel) -> Lease:
    """A request in flight on the model's first replica, as the relay holds one."""
    replica = model.replicas[0]
    return replica.lease(ReplicaPool(model.name, list(model.replicas)))


async def state_of(model: OnDemandModel, state: BackendState) -> None:
    """Wait until the model is in ``state`` (a test's deadline, not a timing)."""
    assert await model.life.until(lambda: model.state is state, timeout=10), model.state


async def settle() -> None:
    for _ in range(100):
        await asyncio.sleep(0)


def request(model: OnDemandModel) -> asyncio.Task[Slot]:
    """A request as the relay makes one: a turn in the model's queue, its start shared."""
    return asyncio.create_task(model.queue.admit(bring_up=model.ready))


async def test_concurrent_requests_share_one_start() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    waiters = [asyncio.create_task(models["a"].ready()) for _ in range(8)]
    await settle()
    assert models["a"].state is S.STARTING
    servers.gate("a").set()
    waited = await asyncio.gather(*waiters)
    assert servers.loads["a"] == 1 and all(w > 0 for w in waited)
    assert models["a"].state is S.READY
    assert await models["a"].ready() == 0.0  # a ready model does not wait


async def test_a_start_wanted_with_nobody_waiting_runs_once_and_its_failure_is_not_lost() -> None:
    """A request went to a fallback rather than wait: the model starts all the same."""
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: unretrieved.append(context))
    try:
        models["a"].want()
        models["a"].want()
        await settle()
        assert servers.loads["a"] == 1 and models["a"].waiting == 0
        assert models["a"].state is S.STARTING
        servers.failing.add("a")
        servers.gate("a").set()
        await state_of(models["a"], S.STOPPED)
        await settle()
        gc.collect()
        assert models["a"].failures == 1 and unretrieved == []
    finally:
        loop.set_exception_handler(previous)


async def test_requests_wait_for_the_start_in_the_models_queue() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    requests = [request(models["a"]) for _ in range(8)]
    await settle()
    assert models["a"].state is S.STARTING and models["a"].waiting == 8
    assert all(not w.admitted for w in models["a"].queue.waiters())  # no turn before it serves
    servers.gate("a").set()
    for slot in await asyncio.gather(*requests):
        slot.release()
    assert servers.loads["a"] == 1 and models["a"].waiting == 0


async def test_the_start_queue_is_the_models_queue_and_is_bounded() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    models["a"].queue.configure(QueueLimits(max_waiting=2, retry_after_starting=7))
    waiters = [request(models["a"]) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as refused:
        await models["a"].queue.admit(bring_up=models["a"].ready)
    assert refused.value.retry_after == 7  # the model is starting: `retry_after.loading`
    servers.gate("a").set()
    await asyncio.gather(*waiters)


async def test_a_client_that_leaves_leaves_the_queue_and_the_start_goes_on() -> None:
    servers = GatedServers()
    _, models = board_of(servers, {"a": 0.5})
    waiter = request(models["a"])
    await settle()
    waiter.cancel()
    await settle()
    assert models["a"].waiting == 0 and models["a"].state is S.STARTING
    servers.gate("a").set()
    await settle()
    assert models["a"].state is S.READY


async def test_a_failed_start_refuses_every_waiting_request_and_backs_off() -> None:
    servers = GatedServers()
    servers.failing.add("a")
    _, models = board_of(servers, {"a": 0.5})
    waiters = [asyncio.create_task(models["a"].ready()) for _ in range(3)]
    await settle()
    servers.gate("a").set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, StartFailed) and "no such model" in str(r) for r in results)
    assert models["a"].state is S.STOPPED and models["a"].not_before > 0
    assert results[0].retry_after >= 2  # type: ignore[union-attr]


async def test_a_start_past_start_timeout_is_stopped_and_refused() -> None:
    servers = GatedServers()  # the gate never opens
    _, models = board_of(servers, {"a": 0.5}, start_timeout=0.2)
    with pytest.raises(StartFailed, match="start_timeout"):
        await models["a"].ready()
    assert servers.unloads["a"] == 1 and models["a"].state is S.STOPPED


async def test_idle_ttl_counts_from_the_end_of_the_last_request() -> None:
    servers = GatedServers()
    servers.gate("a").set()
    _, models = board_of(servers, {"a": 0.5}, idle_ttl=0.3)
    model = models["a"]
    await model.ready()
    stream = hold(model)  # an open stream, longer than the TTL, keeps it
    assert not await model.life.until(lambda: model.state is not S.READY, timeout=0.6)
    stream.release()
    ended = time.monotonic()
    await state_of(model, S.STOPPED)
    assert time.monotonic() - ended >= 0.3  # not before the TTL, counted from the end
    assert servers.unloads["a"] == 1


async def test_a_swap_unloads_the_least_recently_used_idle_model() -> None:
    servers = GatedServers()
    for name in "abc":
        servers.gate(name).set()
    _, models = board_of(servers, {"a": 0.4, "b": 0.4, "c": 0.4}, min_resident=0)
    await models["a"].ready()
    await models["b"].ready()
    await models["a"].ready()  # a was used last
    await models["c"].ready()
    assert models["b"].state is S.STOPPED
    assert models["a"].state is S.READY and models["c"].state is S.READY


async def test_a_busy_model_stays_for_min_resident_then_is_drained() -> None:
    servers = GatedServers()
    servers.gate("a").set()
    servers.gate("b").set()
    _, models = board_of(
        servers, {"a": 0.6, "b": 0.6}, min_resident=0.5, drain_timeout=0.2, idle_ttl=60
    )
    await models["a"].ready()
    resident = time.monotonic()
    request = hold(models["a"])  # busy: only min_resident lets it go
    await asyncio.wait_for(models["b"].ready(), 5)
    assert time.monotonic() - resident >= 0.5  # not unloaded before its min_resident
    assert models["a"].state is S.STOPPED  # drained, then cut after drain_timeout
    assert models["b"].state is S.READY
    request.release()


async def test_a_request_that_arrives_while_its_model_drains_waits_for_the_next_start() -> None:
    servers = GatedServers()
    servers.gate("a").set()
    _, models = board_of(servers, {"a": 0.5}, drain_timeout=5)
    model = models["a"]
    await model.ready()
    request = hold(model)
    unloading = model.unload("admin unload")
    await state_of(model, S.DRAINING)
    late = asyncio.create_task(model.ready())
    await settle()
    assert not late.done()
    request.release()
    await unloading
    assert await asyncio.wait_for(late, 2) > 0
    assert servers.loads["a"] == 2 and model.state is S.READY


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
    _, models = board_of(servers, {"a": 0.3, "b": 0.3})
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
    await state_of(model, S.ASLEEP)
    assert model.replicas[0].state is S.ASLEEP
    assert servers.calls == ["sleep a 1"] and servers.unloads["a"] == 0  # the process lives
    assert await model.ready() > 0
    assert servers.calls == ["sleep a 1", "wake a 1"] and servers.loads["a"] == 1
    assert (model.sleeps, model.wakes, model.state) == (1, 1, S.READY)


async def test_a_swap_puts_the_other_model_to_sleep_and_counts_only_its_context() -> None:
    servers = await opened(GatedServers(), "a", "b")
    board, models = board_of(
        servers, {"a": 0.6, "b": 0.6}, unload="sleep", sleep_level=2, min_resident=0
    )
    await models["a"].ready()
    await models["b"].ready()
    assert servers.calls == ["sleep a 2"]
    assert models["a"].state is S.ASLEEP and board.held() == {0: 0.61}
    await models["a"].ready()  # and back: b sleeps, a wakes with the level it slept at
    assert servers.calls == ["sleep a 2", "sleep b 2", "wake a 2"]


async def test_a_model_with_requests_in_flight_is_drained_before_it_sleeps() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep", drain_timeout=5)
    model = models["a"]
    await model.ready()
    request = hold(model)
    sleeping = model.unload("admin sleep")
    await state_of(model, S.DRAINING)
    await settle()
    assert servers.calls == []
    request.release()
    await sleeping
    assert model.state is S.ASLEEP and servers.calls == ["sleep a 1"]


async def test_requests_still_in_flight_after_drain_timeout_mean_a_stop_not_a_sleep() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep", drain_timeout=0.2)
    model = models["a"]
    await model.ready()
    request = hold(model)
    await model.unload("admin sleep")
    assert model.state is S.STOPPED and servers.calls == []
    request.release()


async def test_a_server_that_does_not_fall_asleep_is_stopped() -> None:
    servers = await opened(GatedServers(), "a")
    servers.insomniac.add("a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep")
    await models["a"].ready()
    await models["a"].unload("idle")
    assert models["a"].state is S.STOPPED and servers.unloads["a"] == 1


async def test_a_failed_wake_restarts_the_servers_and_the_request_still_gets_through() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.6}, unload="sleep")
    model = models["a"]
    await model.ready()
    await model.unload("idle")
    servers.unwakeable.add("a")
    assert await model.ready() > 0
    assert servers.calls[-1] == "wake a 1" and servers.loads["a"] == 2
    assert model.state is S.READY and (model.wakes, model.loads) == (0, 2)


async def test_a_server_that_dies_while_its_model_drains_is_stopped_and_booked_as_nothing() -> None:
    """Its process watcher reports the death; the life answers `stopped`, not `restarting`,
    so the model falls asleep on its other server and the books count one context, not a
    whole share; the next wake starts the dead one again."""
    servers = await opened(GatedServers(), "a", "b")
    life = servers.life("a")
    life.replicas.append(Replica(url="http://a-1", state=S.STOPPED, gpus=(0,)))
    board, models = board_of(servers, {"a": 0.3, "b": 0.6}, unload="sleep", drain_timeout=5)
    model = models["a"]
    await model.ready()
    dying, other = model.replicas
    request = hold(model)  # on `dying`: the drain waits for it
    unloading = model.unload("admin sleep")
    await state_of(model, S.DRAINING)
    assert await life.move(S.RESTARTING, dying) is S.RESTARTING  # its process exited
    assert await life.after_death(dying) is S.STOPPED  # not to be restarted
    request.release()
    await unloading
    assert (model.state, dying.state, other.state) == (S.ASLEEP, S.STOPPED, S.ASLEEP)
    assert board.held() == {0: 0.01}  # one asleep server's context; nothing for the dead one


# A gateway restart with `keep_backends`: the model is where its adopted servers are.


async def test_a_model_adopted_serving_is_ready_without_a_start_and_its_idle_timer_runs() -> None:
    servers = await opened(GatedServers(), "a")
    _, models = board_of(servers, {"a": 0.5}, idle_ttl=0.2)
    model = models["a"]
    await model.adopted(Resumed(asleep=False))  # its load: the servers taken over, at once
    assert model.state is S.READY and model.resident_since is not None
    assert model.loads == 0 and await model.ready() == 0.0  # served at once
    await state_of(model, S.STOPPED)  # idle for its TTL, as after a start
    assert servers.unloads["a"] == 1


async def test_a_model_adopted_asleep_holds_the_asleep_share_and_wakes_at_the_recorded_level() -> (
    None
):
    servers = await opened(GatedServers(), "a", "b")
    _, models = board_of(servers, {"a": 0.6, "b": 0.6}, unload="sleep", sleep_level=1)
    for name, level in (("a", 2), ("b", 0)):  # b's level was not recorded: its configured one
        await servers.life(name).move(S.ASLEEP, models[name].replicas[0])
        await models[name].adopted(Resumed(asleep=True, level=level))
        assert models[name].state is S.ASLEEP and models[name].holds() == {0: 0.01}
    assert servers.loads["a"] == 0
    assert await models["a"].ready() > 0
    assert servers.calls == ["wake a 2"] and models["a"].state is S.READY
    assert await models["b"].ready() > 0  # a swap: a falls asleep at its own level
    assert servers.calls == ["wake a 2", "sleep a 1", "wake b 1"]
