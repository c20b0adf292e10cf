"""What swaps cost, as measured: running estimates from the config or the first observation,
the phases a model's own starts, wakes and sleeps feed, the service rate; and the virtual
clock the scheduler's tests and the replay run on."""

from __future__ import annotations

import asyncio

import pytest

from backends import clock
from backends.swap_costs import ALPHA, DecayedRate, Estimate, Service, SwapCosts
from tests.backends.timed import TimedServers, asleep_config, board_of, served, virtual


def test_the_config_value_stands_until_the_first_observation_replaces_it() -> None:
    costs = SwapCosts({"start": 120.0, "sleep_1": 16.0})
    assert costs.cost("start") == 120.0 and costs.cost("wake_1") is None
    assert costs.sleep(1, first=True) == 16.0  # seeds the first level-1 sleep too
    costs.observe("start", 60.0)
    assert costs.cost("start") == 60.0  # measured beats guessed
    costs.observe("start", 70.0)
    assert costs.cost("start") == pytest.approx(60.0 + ALPHA * 10.0)


def test_a_reload_reseeds_only_what_was_never_measured() -> None:
    costs = SwapCosts({"start": 120.0, "wake_2": 3.0})
    costs.observe("start", 60.0)
    costs.reseed({"start": 90.0, "wake_2": 2.4})
    assert costs.cost("start") == 60.0 and costs.wake(2) == 2.4


def test_with_nothing_configured_the_first_observation_is_the_estimate() -> None:
    estimate = Estimate()
    estimate.observe(2.4)
    assert (estimate.value, estimate.seen) == (2.4, 1)


def test_the_service_rate_counts_overlapping_requests_once() -> None:
    service = Service()
    for began in (0.0, 0.0, 0.0, 0.0):  # four at once, 2 s each, 100 tokens each
        service.served(began, began + 2.0, 100)
    assert service.requests_per_s == pytest.approx(2.0, rel=0.05)  # the older weigh less
    assert service.tokens_per_s == pytest.approx(200.0, rel=0.05)
    assert service.request_s == pytest.approx(2.0)


def test_a_decayed_rate_forgets_and_says_when_it_falls_below_a_level() -> None:
    rate = DecayedRate(tau=100.0)
    for t in range(10):
        rate.tick(float(t))
    assert rate.rate(10.0) == pytest.approx(0.1 * 0.96, rel=0.05)
    when = rate.below_at(0.01, 10.0)
    assert rate.rate(when) == pytest.approx(0.01, rel=1e-6)
    assert rate.below_at(1.0, 10.0) == 10.0  # already below


@virtual
async def test_a_model_measures_its_own_start_wake_and_sleeps() -> None:
    servers = TimedServers()
    servers.add("a", 0.6)
    _, models = board_of(servers, {"a": asleep_config(sleep_level=1)})
    a = models["a"]
    await served(a)
    await a.unload("idle")
    await served(a)
    await a.unload("idle")
    seconds = a.costs.document()["seconds"]
    assert seconds["start"] == pytest.approx(60.0, abs=0.01)
    assert seconds["sleep_1_first"] == pytest.approx(16.0, abs=0.01)
    assert seconds["sleep_1"] == pytest.approx(0.35, abs=0.01)
    assert seconds["wake_1"] == pytest.approx(0.8, abs=0.01)
    assert a.costs.document()["measured"]["wake_2"] == 0


@virtual
async def test_the_virtual_clock_jumps_to_the_next_timer() -> None:
    began = clock.now()
    await asyncio.sleep(3600)
    assert clock.now() - began == pytest.approx(3600.0, abs=0.01)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(10):
            await asyncio.Event().wait()
    assert clock.now() - began == pytest.approx(3610.0, abs=0.01)


def test_a_virtual_loop_on_which_everything_waits_for_ever_says_so() -> None:
    async def stuck() -> None:
        await asyncio.Event().wait()

    with pytest.raises(clock.Stalled):
        clock.run_virtual(stuck())
