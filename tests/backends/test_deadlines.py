"""A request that says how long it waits (`x-vllm-gateway-max-wait`): refused at once when the
estimate is longer, refused when its deadline passes while it waits, never served late; every
refusal of a start carries the estimate. In virtual time, against timed fake servers."""

from __future__ import annotations

import asyncio

import pytest

from backends import clock
from backends.errors import DeadlineUnmet, StartFailed
from backends.lifecycle import BackendState
from backends.queues import QueueLimits
from backends.swap_policy import LruPolicy
from tests.backends.timed import TimedServers, asleep_config, board_of, served, virtual

S = BackendState


@virtual
async def test_a_wait_estimated_past_the_deadline_is_refused_at_once_and_the_wake_goes_on() -> None:
    servers = TimedServers()
    servers.add("a", 0.6)
    _, models = board_of(servers, {"a": asleep_config(costs={"wake_2": 2.4})})
    a = models["a"]
    await served(a)
    await a.unload("idle")
    asked = clock.now()
    with pytest.raises(DeadlineUnmet) as refused:
        await a.ready(asked + 1.0)
    assert clock.now() == asked  # at once
    assert not refused.value.passed
    assert refused.value.estimate == pytest.approx(2.4, abs=0.1)
    assert refused.value.retry_after == refused.value.estimate
    assert "about 2.4s" in str(refused.value) and "x-vllm-gateway-max-wait" in str(refused.value)
    assert a.refused == {"deadline": 1, "deadline_passed": 0}
    await a.life.until(lambda: a.state is S.READY)  # a retry after the estimate finds it up
    assert await a.ready(clock.now() + 1.0) == 0.0


@virtual
async def test_a_deadline_that_passes_while_waiting_refuses_the_request() -> None:
    """Nothing known of its start yet (no estimate): admitted, then refused at its deadline,
    not served 55 s late."""
    servers = TimedServers()
    servers.add("a", 0.6)
    _, models = board_of(servers, {"a": asleep_config()})
    asked = clock.now()
    with pytest.raises(DeadlineUnmet) as refused:
        await models["a"].ready(asked + 5.0)
    assert clock.now() - asked == pytest.approx(5.0, abs=0.01)
    assert refused.value.passed and "deadline passed" in str(refused.value)
    assert models["a"].refused["deadline_passed"] == 1


@virtual
async def test_the_same_request_without_a_deadline_waits_for_the_start() -> None:
    servers = TimedServers()
    servers.add("a", 0.6)
    _, models = board_of(servers, {"a": asleep_config()})
    assert await models["a"].ready() == pytest.approx(60.0, abs=0.01)


@virtual
async def test_the_estimate_adds_the_swap_the_wake_and_the_queue_beyond_the_slots() -> None:
    """`b` asleep (2.4 s to wake) and `a` in its way (0.1 s to sleep, idle): 2.5 s. With five
    requests already waiting, all go at once when `b` serves: still 2.5 s; with one slot
    (`queue.max_in_flight: 1`) and a service rate of 1 request/s, the five go first: 5 s more."""
    servers = TimedServers()
    servers.add("a", 0.6)
    servers.add("b", 0.6)
    config = asleep_config(min_resident=0, costs={"wake_2": 2.4, "sleep_2": 0.1})
    _, models = board_of(servers, {"a": config, "b": config}, LruPolicy())
    a, b = models["a"], models["b"]
    await served(b)
    await served(a)
    assert a.estimate() == 0.0
    assert b.estimate() == pytest.approx(2.5, abs=0.01)
    now = clock.now()
    for i in range(5):  # back to back: 1 request/s
        b.costs.service.served(now + i, now + i + 1.0, 10)
    assert b.costs.service.requests_per_s == pytest.approx(1.0, rel=0.1)
    waiters = [asyncio.create_task(b.ready()) for _ in range(5)]
    await asyncio.sleep(0)
    assert b.waiting == 5 and b.estimate() == pytest.approx(2.5, abs=0.01)
    b.queue.limits = QueueLimits(max_in_flight=1)
    assert b.estimate() == pytest.approx(2.5 + 5.0, rel=0.1)
    await asyncio.gather(*waiters)


@virtual
async def test_a_failed_start_says_when_the_next_one_is_due() -> None:
    servers = TimedServers()
    servers.add("a", 0.6)
    _, models = board_of(servers, {"a": asleep_config(start_timeout=10.0, costs={"start": 60})})
    with pytest.raises(StartFailed) as failed:
        await models["a"].ready()
    assert failed.value.estimate == pytest.approx(2.0 + 60.0)  # the backoff, then a start
    assert "about 62.0s away" in str(failed.value)
