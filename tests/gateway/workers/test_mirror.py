"""A worker's mirror: the control plane's table applied in place, picks weighed by the sum
of every worker's requests, starts asked of the control plane."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from backends.errors import Unavailable
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Replica, ReplicaPool
from backends.prefix_index import PrefixPolicy, PrefixRouter
from gateway.workers.channel import ChannelClosed, Message
from gateway.workers.counters import InFlightTable
from gateway.workers.demand import Demand
from gateway.workers.mirror import Mirror, MirrorReplica, RemoteStart
from gateway.workers.snapshot import table_document
from tests.servers import gateway_settings

S = BackendState


class ControlPlane:
    """The control plane's pools, as the documents it pushes describe them."""

    def __init__(self, *names: str, replicas: int = 2) -> None:
        self.lives = {
            n: ModelLife(n, [Replica(f"http://{n}-{i}") for i in range(replicas)]) for n in names
        }
        self.pools = [ReplicaPool(n, life.replicas, life=life) for n, life in self.lives.items()]
        self.slots: dict[int, int] = {}
        settings = gateway_settings(
            [{"name": n, "url": "http://x", "aliases": [f"{n}-alias"]} for n in names]
        )
        self.models = {m.name: m for m in settings.models}

    def on_demand(self, name: str) -> None:
        """``name`` is started on demand, and stopped now (its policy is not a worker's)."""
        life = self.lives[name]
        life.state = S.STOPPED
        pool = next(p for p in self.pools if p.name == name)
        pool.on_demand = RemoteStart(name, life, Told().ask, Demand(lambda _: None))  # any

    def slot(self, replica: Replica) -> int:
        return self.slots.setdefault(id(replica), len(self.slots))

    def document(self) -> dict[str, Any]:
        doc = table_document(self.pools, self.models, self.slot)
        return orjson.loads(orjson.dumps(doc))  # as it crosses the channel


class Told:
    def __init__(self) -> None:
        self.notices: list[Message] = []
        self.asked: list[Message] = []
        self.answer: Message | Exception = {"waited": 1.5}

    async def ask(self, message: Message) -> Message:
        self.asked.append(message)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def mirror_of(told: Told, table: InFlightTable | None = None, row: int = 0) -> Mirror:
    return Mirror(table, row, told.notices.append, told.ask)


def test_the_table_routes_names_and_aliases_to_pools_of_the_same_replicas() -> None:
    plane, mirror = ControlPlane("a", "b"), mirror_of(Told())
    mirror.apply(plane.document(), 1)
    assert [p.name for p in mirror.pools] == ["a", "b"]
    assert mirror.routes.resolve("b-alias").pool is mirror.pools[1]
    assert [r.url for r in mirror.pools[0].replicas] == ["http://a-0", "http://a-1"]


def test_a_new_document_updates_the_replicas_a_request_may_hold_instead_of_replacing_them() -> None:
    plane, mirror = ControlPlane("a"), mirror_of(Told())
    mirror.apply(plane.document(), 1)
    held = mirror.pools[0].replicas[0]
    plane.pools[0].replicas[0].state = S.RESTARTING
    plane.pools[0].replicas[0].url = "http://a-0-again"
    mirror.apply(plane.document(), 2)
    assert mirror.pools[0].replicas[0] is held
    assert (held.state, held.url, held.ready) == (S.RESTARTING, "http://a-0-again", False)


def test_a_model_gone_from_the_table_is_not_routed_and_its_pool_stays_whole_for_its_requests() -> (
    None
):
    plane, mirror = ControlPlane("a", "b"), mirror_of(Told())
    mirror.apply(plane.document(), 1)
    gone = mirror.pools[1]
    plane.pools.pop()
    mirror.apply(plane.document(), 2)
    assert [p.name for p in mirror.pools] == ["a"]
    with pytest.raises(Exception, match="does not exist"):
        mirror.routes.resolve("b")
    assert len(gone.replicas) == 2


async def test_a_request_waiting_for_its_model_wakes_when_the_table_says_it_serves() -> None:
    plane, mirror = ControlPlane("a", replicas=1), mirror_of(Told())
    plane.pools[0].replicas[0].state = S.RESTARTING
    mirror.apply(plane.document(), 1)
    pool = mirror.pools[0]
    assert pool.life is not None
    waiting = asyncio.create_task(pool.life.until(lambda: pool.ready_for(), timeout=5))
    await asyncio.sleep(0)
    plane.pools[0].replicas[0].state = S.READY
    mirror.apply(plane.document(), 2)
    assert await waiting


def test_balancing_weighs_every_workers_requests_and_only_zero_crossings_are_told() -> None:
    table = InFlightTable.create(rows=2, slots=8)
    plane = ControlPlane("a")
    here, there = Told(), Told()
    mirror, other = mirror_of(here, table, 0), mirror_of(there, table, 1)
    mirror.apply(plane.document(), 1)
    other.apply(plane.document(), 1)
    busy = other.pools[0].replicas[0]
    leases = [busy.lease(other.pools[0]) for _ in range(3)]  # the other worker's requests
    assert there.notices == [{"t": "busy", "slot": 0}]
    pool = mirror.pools[0]
    assert pool.replicas[0].in_flight == 3  # the whole gateway's
    assert isinstance(busy, MirrorReplica) and busy.own == 3
    assert pool.pick() is pool.replicas[1]  # this worker holds nothing on either
    for lease in leases:
        lease.release()
    assert there.notices == [{"t": "busy", "slot": 0}, {"t": "idle", "slot": 0}]
    assert pool.replicas[0].in_flight == 0 and busy.own == 0


def on_demand_mirror(plane: ControlPlane, told: Told) -> tuple[Mirror, RemoteStart]:
    """A worker's mirror of ``plane`` with its model `a` on demand, and `a`'s stand-in."""
    plane.on_demand("a")
    mirror = mirror_of(told)
    mirror.apply(plane.document(), 1)
    start = mirror.pools[0].on_demand
    assert isinstance(start, RemoteStart)
    return mirror, start


async def test_an_on_demand_model_is_started_by_asking_the_control_plane() -> None:
    plane, told = ControlPlane("a", replicas=1), Told()
    _, start = on_demand_mirror(plane, told)
    assert not start.serving
    assert await start.ready() == 1.5
    assert told.asked == [{"t": "ready", "model": "a", "left": None, "key": None, "priority": 0}]


async def test_a_request_that_asked_for_its_start_is_counted_there_and_one_that_did_not_here() -> (
    None
):
    """The control plane's ``ready()`` counted the first's arrival: a worker tells only its
    end; the second found the model serving: its arrival is told too."""
    plane, told = ControlPlane("a", replicas=1), Told()
    mirror, start = on_demand_mirror(plane, told)
    assert await start.ready(key="k") == 1.5
    start.served(2.0, 7)
    mirror.demand.flush()
    plane.lives["a"].state = S.READY
    mirror.apply(plane.document(), 2)
    assert await start.ready(key="k") == 0.0
    mirror.demand.flush()
    assert [m["t"] for m in told.asked] == ["ready"]
    demand = [m["models"]["a"] for m in told.notices if m["t"] == "demand"]
    assert [d["arrived"] for d in demand] == [[], [[0.0, "k", 0]]]
    assert [len(d["served"]) for d in demand] == [1, 0]


async def test_a_refused_start_and_a_gone_control_plane_are_the_backends_own_errors() -> None:
    plane, told = ControlPlane("a", replicas=1), Told()
    _, start = on_demand_mirror(plane, told)
    told.answer = {"error": {"message": "queue full", "retry_after": 5.0}}
    with pytest.raises(Unavailable, match="queue full") as refused:
        await start.ready()
    assert refused.value.retry_after == 5.0
    told.answer = ChannelClosed()
    with pytest.raises(Unavailable, match="shutting down"):
        await start.ready()


def test_leases_on_two_workers_change_each_ones_own_count_by_one() -> None:
    table = InFlightTable.create(rows=2, slots=8)
    plane = ControlPlane("a", replicas=1)
    mirrors = [mirror_of(Told(), table, row) for row in (0, 1)]
    for mirror in mirrors:
        mirror.apply(plane.document(), 1)
    (a, pool_a), (b, pool_b) = ((m.pools[0].replicas[0], m.pools[0]) for m in mirrors)
    assert isinstance(a, MirrorReplica) and isinstance(b, MirrorReplica)
    first, second = a.lease(pool_a), a.lease(pool_a)
    third = b.lease(pool_b)
    first.release()
    assert (a.own, b.own, a.in_flight, b.in_flight) == (1, 1, 2, 2)
    second.release()
    third.release()
    assert (a.own, b.own, table.total(0)) == (0, 0, 0)


def test_a_workers_prefix_index_keeps_what_it_learnt_when_only_its_knobs_change() -> None:
    """As the control plane's does on a reload (gateway.prompt_prefix.prefix_router): only
    blocks of another size make every hash it holds another."""
    plane, mirror = ControlPlane("a"), mirror_of(Told())
    plane.pools[0].policy = "prefix"
    plane.pools[0].prefix = PrefixRouter(PrefixPolicy(block_bytes=16))
    mirror.apply(plane.document(), 1)
    index = mirror.pools[0].prefix
    assert index is not None
    plane.pools[0].prefix = PrefixRouter(PrefixPolicy(block_bytes=16, slack=5))
    mirror.apply(plane.document(), 2)
    assert mirror.pools[0].prefix is index and index.policy.slack == 5
    plane.pools[0].prefix = PrefixRouter(PrefixPolicy(block_bytes=32, slack=5))
    mirror.apply(plane.document(), 3)
    assert mirror.pools[0].prefix is not index
    plane.pools[0].prefix = None
    mirror.apply(plane.document(), 4)
    assert mirror.pools[0].prefix is None
