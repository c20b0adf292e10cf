"""A worker's requests to on-demand models, told to the control plane in batches and counted
there as one process counts its own (the swap scheduler's demand, the service rate); in
virtual time (``backends.clock``), so each notice's time is exact."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from backends import clock
from backends.life import ModelLife
from backends.lifecycle import BackendState
from gateway.workers.channel import Message
from gateway.workers.demand import TELL_EVERY, Demand, note
from gateway.workers.mirror import RemoteStart
from tests.backends.timed import TimedServers, asleep_config, board_of, served, virtual


class Notices:
    """What a worker told, and when (on the one clock of the test)."""

    def __init__(self) -> None:
        self.told: list[tuple[float, Message]] = []

    def __call__(self, message: Message) -> None:
        self.told.append((clock.now(), message))


def rounded(rows: list[list[Any]]) -> list[list[Any]]:
    """A notice's rows with their seconds to the centisecond (virtual time moves a microsecond
    a turn)."""
    return [[round(v, 2) if isinstance(v, float) else v for v in row] for row in rows]


def serving(name: str) -> ModelLife:
    life = ModelLife(name, [], on_demand=True)
    life.state = BackendState.READY
    return life


@virtual
async def test_arrivals_after_a_quiet_spell_go_at_once_and_the_rest_once_a_second() -> None:
    notices = Notices()
    demand = Demand(notices)
    began = clock.now()
    demand.arrived("m", "k", 0)
    assert [at - began for at, _ in notices.told] == [0.0]  # the first after a quiet spell
    for _ in range(6):  # at 0.3, 0.6, ... 1.8
        await asyncio.sleep(0.3)
        demand.arrived("m", "k", 0)
        demand.served("m", 0.2, 10)
    await asyncio.sleep(1.7)  # quiet since the notice at 2.0
    demand.arrived("m", "j", 5)
    assert [round(at - began, 3) for at, _ in notices.told] == [0.0, 1.0, 2.0, 3.5]
    arrived = [rounded(m["models"]["m"]["arrived"]) for _, m in notices.told]
    assert arrived == [
        [[0.0, "k", 0]],
        [[0.7, "k", 0], [0.4, "k", 0], [0.1, "k", 0]],  # ages: seconds before the notice
        [[0.8, "k", 0], [0.5, "k", 0], [0.2, "k", 0]],
        [[0.0, "j", 5]],
    ]
    served = rounded(notices.told[1][1]["models"]["m"]["served"])
    assert served == [[0.7, 0.2, 10], [0.4, 0.2, 10], [0.1, 0.2, 10]]


@virtual
async def test_a_served_request_alone_waits_a_second_for_the_ones_after_it() -> None:
    notices = Notices()
    demand = Demand(notices)
    began = clock.now()
    demand.served("m", 1.5, 20)
    await asyncio.sleep(0.5)
    demand.served("m", 0.5, 30)
    await asyncio.sleep(TELL_EVERY)
    assert [round(at - began, 3) for at, _ in notices.told] == [TELL_EVERY]
    told = notices.told[0][1]["models"]["m"]
    assert told["arrived"] == [] and rounded(told["served"]) == [[1.0, 1.5, 20], [0.5, 0.5, 30]]


@virtual
async def test_a_workers_requests_count_in_the_control_plane_as_one_processs_own() -> None:
    """The same requests, overlapping and of three keys, to a model in one process and through
    a worker to another: the same demand, keys and service figures; in a few notices."""
    servers = TimedServers()
    servers.add("own", 0.4)
    servers.add("relayed", 0.4)
    _, models = board_of(servers, {"own": asleep_config(), "relayed": asleep_config()})
    own, relayed = models["own"], models["relayed"]
    await asyncio.gather(own.ready(), relayed.ready())  # started: one arrival each, here
    notices = Notices()

    def tell(message: Message) -> None:  # the control plane's side of the channel
        notices(message)
        note(relayed, message["models"]["relayed"])

    start = RemoteStart("relayed", serving("relayed"), _never_asked, Demand(tell))
    keys = ["a", "b", "c"]

    async def in_one_process(i: int) -> None:
        await asyncio.sleep(0.3 * i)
        await served(own, 0.5 + 0.2 * (i % 3), key=keys[i % 3])

    async def through_a_worker(i: int) -> None:
        await asyncio.sleep(0.3 * i)
        assert await start.ready(key=keys[i % 3]) == 0.0
        await asyncio.sleep(0.5 + 0.2 * (i % 3))
        start.served(0.5 + 0.2 * (i % 3), 100)

    requests = 12
    await asyncio.gather(
        *(in_one_process(i) for i in range(requests)),
        *(through_a_worker(i) for i in range(requests)),
    )
    await asyncio.sleep(TELL_EVERY)  # the last notice
    now = clock.now()
    assert relayed.arrivals.rate(now) == pytest.approx(own.arrivals.rate(now), rel=1e-3)
    assert relayed.asked_with == pytest.approx(own.asked_with, abs=1e-3)
    assert relayed.asked_by == pytest.approx(own.asked_by, abs=1e-3)
    assert set(own.asked_by) == {None, *keys}  # None: the start, asked by nobody's key
    mine, theirs = own.costs.service, relayed.costs.service
    assert (theirs.requests, theirs.tokens) == pytest.approx((mine.requests, mine.tokens))
    assert (theirs.busy, theirs.length) == pytest.approx((mine.busy, mine.length), abs=1e-2)
    assert relayed.costs.document()["requests_per_s"] is not None
    times = [at for at, _ in notices.told]
    assert len(times) <= requests / 2  # 24 counts (12 arrivals, 12 ends) in a few notices
    assert all(later - earlier >= TELL_EVERY for earlier, later in itertools.pairwise(times))


async def _never_asked(message: Message) -> Message:
    raise AssertionError(f"asked the control plane: {message}")


@virtual
async def test_two_workers_notices_count_as_one_process_counts_though_they_come_out_of_order() -> (
    None
):
    """A worker's batch may hold requests older than one another worker told already."""
    servers = TimedServers()
    servers.add("own", 0.4)
    servers.add("relayed", 0.4)
    _, models = board_of(servers, {"own": asleep_config(), "relayed": asleep_config()})
    own, relayed = models["own"], models["relayed"]
    await asyncio.gather(own.ready(), relayed.ready())
    base = clock.now()

    def tell(message: Message) -> None:
        note(relayed, message["models"]["relayed"])

    life = serving("relayed")
    first, second = (RemoteStart("relayed", life, _never_asked, Demand(tell)) for _ in "ab")

    async def at(seconds: float, start: RemoteStart) -> None:
        await asyncio.sleep(base + seconds - clock.now())
        await asyncio.gather(own.ready(key="k"), start.ready(key="k"))

    await asyncio.gather(at(0.0, second), at(0.5, second), at(0.8, first))
    await asyncio.sleep(TELL_EVERY)  # the second worker's 0.5 s request, told after 0.8 s's
    now = clock.now()
    assert relayed.arrivals.rate(now) == pytest.approx(own.arrivals.rate(now), rel=1e-3)
    assert relayed.asked_by["k"] == pytest.approx(own.asked_by["k"], abs=1e-3)
