"""The cost policy's decisions, each against fake servers that take the H200's seconds, in
virtual time: which model leaves, batching and its bound, the sleep level, priorities, pinned
models, the thrash guard, and swaps nobody waits for. LRU, kept beside it, where they differ."""

from __future__ import annotations

import asyncio
from typing import Any

from pytest import approx

from backends import clock
from backends.cost_policy import THRASH_SWAPS, CostPolicy
from backends.errors import DeadlineUnmet
from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel
from backends.swap_costs import DecayedRate
from backends.swap_policy import LruPolicy, return_cost
from backends.swaps import AUTO, AUTO_WINDOW_MAX, BatchWindows, Window
from tests.backends.timed import GIB, TimedServers, asleep_config, board_of, served, virtual

S = BackendState


async def stream(
    model: OnDemandModel, every: float, until: float, key: str = "resident's"
) -> list[float]:
    """Requests of 1 s every ``every`` seconds until ``until`` (clock time); their waits."""
    waits = []
    while clock.now() < until:
        waits.append(await served(model, 1.0, key=key))
        await asyncio.sleep(every - 1.0)
    return waits


@virtual
async def test_the_model_leaves_whose_return_costs_least_not_the_least_recently_used() -> None:
    """`hot` had ten requests, `warm` one, more recently: LRU sends `hot` away, the cost
    policy `warm` (its demand times its wake is the smaller)."""
    for policy, leaves, stays in ((CostPolicy(), "warm", "hot"), (LruPolicy(), "hot", "warm")):
        servers = TimedServers()
        for name, share in (("hot", 0.5), ("warm", 0.44), ("new", 0.44)):
            servers.add(name, share)
        board, models = board_of(
            servers, {n: asleep_config(min_resident=0) for n in ("hot", "warm", "new")}, policy
        )
        for _ in range(10):
            await served(models["hot"])
        await served(models["warm"])
        await served(models["new"])
        assert models[leaves].state is S.ASLEEP, policy.name
        assert models[stays].state is S.READY and models["new"].state is S.READY
        await board.close()


async def one_slot(
    policy: CostPolicy | LruPolicy, window: Window = 30.0, **config: Any
) -> dict[str, OnDemandModel]:
    """`a` and `b` on one GPU, never together; `b` was up once and is asleep (stopped with
    `unload: stop`), `a` serves."""
    servers = TimedServers()
    servers.add("a", 0.6)
    servers.add("b", 0.6)
    fields = {"min_resident": 0.0, "costs": {"wake_2": 2.4, "sleep_2": 0.1}, **config}
    _, models = board_of(servers, {n: asleep_config(**fields) for n in "ab"}, policy, window)
    await served(models["b"])
    await served(models["a"])
    assert models["b"].state is (S.STOPPED if config.get("unload") == "stop" else S.ASLEEP)
    return models


@virtual
async def test_a_resident_in_use_serves_its_requests_for_the_batch_window_first() -> None:
    models = await one_slot(CostPolicy())
    a, b = models["a"], models["b"]
    began = clock.now()
    busy = asyncio.create_task(stream(a, every=5.0, until=began + 120))
    await asyncio.sleep(60)  # a steady stream: a request every 5 s
    asked = clock.now()
    waited = await served(b, key="newcomer's")
    assert 30.0 <= waited <= 30.0 + 5.0  # the window (30 s), then the swap
    assert a.state is S.ASLEEP or a.state is S.DRAINING or a.waiting
    waits = await busy
    during = waits[int((asked - began) / 5.0) + 1 : int((asked + 29 - began) / 5.0)]
    assert during and all(w == 0.0 for w in during)  # a served them at once meanwhile


def asked_alike(*models: OnDemandModel) -> None:
    """Each model's recent demand: one request, just now."""
    for model in models:
        model.arrivals = DecayedRate()
        model.arrivals.tick(clock.now())


@virtual
async def test_the_auto_window_is_the_swaps_time_stretched_by_the_residents_demand() -> None:
    """`auto` (the default): as long as the swap takes (`a`'s sleep and `b`'s wake, 0.1 + 2.4
    s) between models asked as often as each other; ten times that for a model asked ten
    times as often as the newcomer; never more than ``AUTO_WINDOW_MAX``."""
    models = await one_slot(CostPolicy(), window=AUTO)
    a, b = models["a"], models["b"]
    board = a.board
    assert board is not None
    asked_alike(a, b)
    assert board.batch_window(b, [a]) == approx(2.5, rel=0.01)
    for _ in range(9):
        a.arrivals.tick(clock.now())
    assert board.batch_window(b, [a]) == approx(25.0, rel=0.01)
    for _ in range(1000):
        a.arrivals.tick(clock.now())
    assert board.batch_window(b, [a]) == AUTO_WINDOW_MAX


@virtual
async def test_the_auto_window_keeps_a_busy_model_in_session_longer_than_a_swap() -> None:
    models = await one_slot(CostPolicy(), window=AUTO)
    a, b = models["a"], models["b"]
    began = clock.now()
    busy = asyncio.create_task(stream(a, every=2.0, until=began + 60))
    await asyncio.sleep(20)  # a steady stream: a request every 2 s, ten so far
    waited = await served(b, key="newcomer's")
    assert 3 * 2.5 < waited <= AUTO_WINDOW_MAX + 1.0 + 2.5  # held, then a's drain and the swap
    waits = await busy
    assert all(w == 0.0 for w in waits[:12])  # a served its session at once meanwhile


@virtual
async def test_the_auto_window_follows_what_the_swap_costs() -> None:
    """Where the newcomer comes back by a cold start instead of a wake, a hold is worth more:
    the swap is a stop and a start. A number set for a group of GPUs is used as it is (the
    smallest where several apply); `auto` in a group is that group's own."""
    sleepers = await one_slot(CostPolicy(), window=AUTO)
    stoppers = await one_slot(CostPolicy(), window=AUTO, unload="stop")
    a, b = stoppers["a"], stoppers["b"]
    assert a.board is not None
    asked_alike(a, b)
    # `a` never stopped yet: a part nobody measured nor configured counts nothing
    assert a.board.batch_window(b, [a]) == approx(60.0, rel=0.01)
    a.board.windows = BatchWindows(AUTO, ((frozenset({0}), 90.0), (frozenset({0, 1}), AUTO)))
    assert a.board.batch_window(b, [a]) == approx(60.0, rel=0.01)
    a.board.windows = BatchWindows(AUTO, ((frozenset({0}), 20.0), (frozenset({0, 1}), 0.0)))
    assert a.board.batch_window(b, [a]) == 0.0
    c, d = sleepers["a"], sleepers["b"]
    asked_alike(c, d)
    assert c.board is not None and c.board.batch_window(d, [c]) == approx(2.5, rel=0.01)


@virtual
async def test_lru_swaps_at_once_instead() -> None:
    models = await one_slot(LruPolicy())
    busy = asyncio.create_task(stream(models["a"], every=5.0, until=clock.now() + 120))
    await asyncio.sleep(60)
    assert await served(models["b"]) < 5.0
    await busy


@virtual
async def test_batching_never_keeps_a_request_past_its_deadline() -> None:
    """A deadline of 10 s: the swap begins by then less its estimate (drain, sleep, wake)."""
    models = await one_slot(CostPolicy())
    busy = asyncio.create_task(stream(models["a"], every=5.0, until=clock.now() + 120))
    await asyncio.sleep(60)
    waited = await served(models["b"], deadline=clock.now() + 10.0, key="newcomer's")
    assert 4.0 <= waited <= 10.0  # batched for a while, served within its 10 s
    await busy


@virtual
async def test_the_resident_keeps_serving_while_in_session_then_the_swap_goes_at_once() -> None:
    """A window of 60 s: `a` is in session while used within half of it (30 s). Its stream
    ends 20 s after `b` asks; the swap goes 30 s after `a`'s last request, not at the window."""
    models = await one_slot(CostPolicy(), window=60.0)
    a, b = models["a"], models["b"]
    began = clock.now()
    busy = asyncio.create_task(stream(a, every=5.0, until=began + 30))
    await asyncio.sleep(10)
    waited = await served(b, key="newcomer's")
    await busy
    last = a.replicas[0].last_done - began  # about 26 s: the request begun at 25 s ended
    assert last == approx(26.0, abs=0.1)
    assert waited == approx(last + 30.0 - 10.0 + 0.1 + 2.4, abs=0.1)  # quiet, sleep, wake
    assert waited < 60.0


@virtual
async def test_a_caller_batches_its_own_work_but_its_session_holds_no_one_else_back() -> None:
    """`x` streams to `a` and asks for `b`: alone, its session on `a` holds its own swap
    (batching). Once `y` waits for `c` on the same GPU, `x` alternates: its use of `a` and
    then of `b` holds nobody back, and `y` waits for two swaps, not the window."""
    servers = TimedServers()
    for name in "abc":
        servers.add(name, 0.6)
    config = asleep_config(min_resident=0.0, costs={"wake_2": 2.4, "sleep_2": 0.1})
    board, models = board_of(servers, {n: config for n in "abc"}, window=60.0)
    for name in "cba":
        await served(models[name])
    busy = asyncio.create_task(stream(models["a"], every=5.0, until=clock.now() + 120, key="x"))
    await asyncio.sleep(30)
    own = asyncio.create_task(served(models["b"], key="x"))
    await asyncio.sleep(20)
    assert not own.done()  # held for `x`'s own session on `a`
    assert await served(models["c"], key="y") < 10.0  # two swaps, a request drained
    assert 20.0 < await own < 25.0  # it went at once when `y` came
    await busy
    await board.close()


@virtual
async def test_a_hot_model_between_two_requests_stays_and_a_rarely_used_busy_one_leaves() -> None:
    """`hot` serves a request every 2 s and is idle at the moment `new` asks; `warm` has one
    long request in flight and nothing else. Its demand times its wake is the smaller: `warm`
    leaves once that request ends, though `hot` alone is idle at that moment."""
    servers = TimedServers()
    for name, share in (("hot", 0.5), ("warm", 0.44), ("new", 0.44)):
        servers.add(name, share)
    configs = {n: asleep_config(min_resident=0) for n in ("hot", "warm", "new")}
    board, models = board_of(servers, configs, window=0.0)
    hot, warm, new = models["hot"], models["warm"], models["new"]
    for model in (new, hot, warm):  # `warm` sends `new` (idle) to sleep
        await served(model)
    assert new.state is S.ASLEEP
    began = clock.now()
    busy = asyncio.create_task(stream(hot, every=2.0, until=began + 60))
    long = asyncio.create_task(served(warm, 20.0, key="warm's"))
    await asyncio.sleep(11.5)  # `hot`'s request of 10-11 s has ended, the next is at 12 s
    assert hot.in_flight == 0 and warm.in_flight == 1
    waited = await served(new, key="new's")
    assert waited >= 20.0 - 11.5  # `warm` drained first
    assert hot.state is S.READY and warm.state is S.ASLEEP
    await asyncio.gather(busy, long)
    await board.close()


@virtual
async def test_a_model_still_waking_costs_a_wake_to_bring_back_not_a_start() -> None:
    models = await one_slot(CostPolicy(), costs={"wake_2": 2.4, "sleep_2": 0.1, "start": 60.0})
    b = models["b"]
    assert b.board is not None
    waking = asyncio.create_task(served(b))
    await b.life.until(lambda: b.state is S.WAKING)
    assert return_cost(b, b.board) == approx(2.4)
    await waking


@virtual
async def test_an_idle_resident_with_little_demand_is_swapped_at_once() -> None:
    models = await one_slot(CostPolicy())
    await asyncio.sleep(300)  # `a` has been quiet for minutes
    assert await served(models["b"]) < 4.0


@virtual
async def test_level_1_while_the_host_has_memory_for_the_weights_then_level_2() -> None:
    """`sleep_level: auto`: 100 GiB free and 70 GiB of weights each. `a` sleeps at 1 (its
    weights fill host memory), then `b` finds too little left and sleeps at 2; `a` sleeps at 1
    again: its servers kept their host copy."""
    servers = TimedServers(host_free=100 * GIB)
    servers.add("a", 0.6, weights=70 * GIB)
    servers.add("b", 0.6, weights=70 * GIB)
    _, models = board_of(servers, {n: asleep_config(sleep_level="auto") for n in "ab"})
    for name in "abab":
        await served(models[name])
    sleeps = [c for c in servers.calls if c.startswith("sleep")]
    assert sleeps == ["sleep a 1", "sleep b 2", "sleep a 1"]
    assert models["a"].costs.cost("sleep_1_first") == approx(
        16.0, abs=0.01
    )  # the first: weights copied
    assert models["a"].costs.cost("sleep_1") == approx(0.35, abs=0.01)  # then only the GPU freed


@virtual
async def test_a_model_that_outranks_keeps_its_gpu_while_in_use() -> None:
    """`a` (priority 1) is busy; `b` waits until `a` has been quiet for `min_resident`."""
    models = await one_slot(CostPolicy(), min_resident=20.0)
    a, b = models["a"], models["b"]
    a.config = asleep_config(priority=1, min_resident=20.0)
    long = asyncio.create_task(served(a, 15.0))
    await asyncio.sleep(1)
    waiting = asyncio.create_task(served(b))
    await long
    ended = clock.now()
    await waiting
    assert clock.now() - ended >= 20.0  # after `a`'s quiet min_resident, not its last request
    assert b.state is S.READY


@virtual
async def test_the_most_urgent_waiters_take_their_turn_first() -> None:
    """`low` (priority 0) asks before `high` (priority 1); both wait for `a`, which outranks
    them; once `a` may go, `high` comes in first."""
    servers = TimedServers({"start": 5.0})
    for name in ("a", "low", "high"):
        servers.add(name, 0.6)
    configs = {n: asleep_config(min_resident=10.0) for n in ("low", "high")}
    configs["a"] = asleep_config(priority=2, min_resident=10.0)
    _, models = board_of(servers, configs)
    await served(models["a"])
    low = asyncio.create_task(served(models["low"]))
    await asyncio.sleep(1)
    high = asyncio.create_task(served(models["high"], priority=1))
    await asyncio.gather(low, high)
    starts = [c for c in servers.calls if c.startswith("start")]
    assert starts == ["start a", "start high", "start low"]


@virtual
async def test_a_pinned_model_loads_at_start_and_is_never_swapped_out() -> None:
    servers = TimedServers()
    servers.add("pinned", 0.6)
    servers.add("other", 0.6)
    configs = {
        "pinned": asleep_config(pinned=True, unload="stop", sleep_level=1, idle_ttl=10.0),
        "other": asleep_config(costs={"start": 60.0}),
    }
    board, models = board_of(servers, configs)
    board.start()
    await models["pinned"].life.until(lambda: models["pinned"].state is S.READY)
    await asyncio.sleep(60)  # well past its idle_ttl: `unload: stop` never stops it
    try:
        await served(models["other"], deadline=clock.now() + 100)
    except DeadlineUnmet as refused:
        assert refused.passed  # it waited for room that never came, then was refused
    assert models["pinned"].state is S.READY and models["other"].state is S.STOPPED
    await board.close()


@virtual
async def test_a_pinned_model_still_sleeps_when_idle_and_wakes_for_its_requests() -> None:
    servers = TimedServers()
    servers.add("pinned", 0.6)
    servers.add("other", 0.6)
    configs = {"pinned": asleep_config(pinned=True, idle_ttl=10.0), "other": asleep_config()}
    board, models = board_of(servers, configs)
    board.start()
    pinned = models["pinned"]
    await pinned.life.until(lambda: pinned.state is S.ASLEEP)  # idle: it sleeps
    await served(models["other"])  # asleep, it holds only its context: `other` fits
    assert await served(pinned) > 0 and models["other"].state is S.ASLEEP
    await board.close()


@virtual
async def test_one_key_alternating_gets_a_swap_per_min_resident_and_others_go_first() -> None:
    """`x` alternates between `flip` and `flop`, which cannot share the GPU. Alone, each of
    its swaps first waits out its own session on the other (quiet for half the 30 s window:
    batching its own work); after more than `THRASH_SWAPS` it is a thrasher, and each of its
    swaps waits for `min_resident` (30 s) of the model in its way, while `y`'s request for
    `steady` goes in first, at once."""
    servers = TimedServers({"start": 1.0})
    for name in ("flip", "flop", "steady"):
        servers.add(name, 0.6)
    _, models = board_of(servers, {n: asleep_config() for n in ("flip", "flop", "steady")})
    waits = [await served(models[("flip", "flop")[i % 2]], key="x") for i in range(7)]
    free = int(THRASH_SWAPS) + 2  # its first start, then more than THRASH_SWAPS swaps
    assert waits[0] < 5.0
    assert all(15.0 <= w < 20.0 for w in waits[1:free])
    assert all(w >= 30.0 for w in waits[free:])
    guarded = asyncio.create_task(served(models["flop"], key="x"))
    await asyncio.sleep(1)
    assert await served(models["steady"], key="y") < 5.0
    assert await guarded >= 25.0


@virtual
async def test_lru_lets_the_alternating_key_swap_every_time() -> None:
    servers = TimedServers({"start": 1.0})
    for name in ("flip", "flop"):
        servers.add(name, 0.6)
    _, models = board_of(servers, {n: asleep_config() for n in ("flip", "flop")}, LruPolicy())
    waits = [await served(models[("flip", "flop")[i % 2]], key="x") for i in range(8)]
    assert all(w < 5.0 for w in waits)


@virtual
async def test_a_swap_nobody_waits_for_any_more_is_dropped() -> None:
    """`b`'s only request is refused at once (2.4 s to wake, 1 s allowed); its wake, asked
    for all the same, would have to wait for `a`, which is in use: it is dropped."""
    models = await one_slot(CostPolicy())
    a, b = models["a"], models["b"]
    busy = asyncio.create_task(stream(a, every=5.0, until=clock.now() + 100))
    await asyncio.sleep(30)
    try:
        await b.ready(clock.now() + 1.0)
        raise AssertionError("served")
    except DeadlineUnmet as refused:
        assert not refused.passed and refused.estimate is not None and refused.estimate > 1
    await busy
    assert b.state is S.ASLEEP and b.wakes == 0
