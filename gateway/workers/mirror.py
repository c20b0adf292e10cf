"""A worker's copy of the control plane's models and replicas, which its relay routes by.

The control plane's lives (``backends.life``) are the one writer of every state; a worker only
copies them. Each document the control plane pushes (``gateway.workers.snapshot``) is applied
here, whole and at once, on the channel's reading task: the pools, their replicas (recognised
by their slot in the in-flight table), the routes. The mirror's own ``ModelLife`` per model is
written by nothing but ``Mirror.apply``, which sets the states it is told (their transitions
were checked where they were made) and fires the life's signal, so a request waiting for a
restarting model (``gateway.relay``) wakes as it would in one process.

A replica's in-flight count is the whole gateway's (``MirrorReplica``: the column's sum of the
shared table), which is what balancing weighs; a lease changes this worker's own cell. This
worker's count going from zero to some or back is told to the control plane (``busy``,
``idle``), which is how its drains and idle timers learn about requests that none of its own
leases hold.

An on-demand model's stand-in (``RemoteStart``) asks the control plane for a start or a wake
and waits for its answer; the control plane sends the model's new state before that answer.
The requests that find it serving, and every request it served, are counted here and told in
batches (``gateway.workers.demand``), so the swap scheduler weighs them as one process does; a
request that went to a fallback rather than wait for its start is told at once (``want``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from backends import clock
from backends.errors import ShuttingDown
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Ejection, Replica, ReplicaPool, VllmLoad
from backends.prefix_index import PrefixPolicy, PrefixRouter
from gateway.routing import RouteTable
from gateway.workers.channel import ChannelClosed, Message
from gateway.workers.counters import InFlightTable
from gateway.workers.demand import Demand
from gateway.workers.refusals import refused
from gateway.workers.snapshot import Document
from gateway.workers.turns import RemoteQueue, Turns

Edge = Callable[[int, int], None]  # (slot, this worker's new count), told on 0 <-> some


class MirrorReplica(Replica):
    """A replica as one worker sees it. ``in_flight`` reads the replica's requests through the
    whole gateway (the column's sum: what balancing and the prefix index weigh, as they weigh
    one process's count), and a lease's ``+= 1`` or ``-= 1`` changes this worker's own count,
    its cell of the table, by that one: the change from the value read just before, with no
    await between (nothing else on this worker's loop can run there, and another worker's
    cells are not this one's)."""

    def __init__(
        self, slot: int | None, table: InFlightTable | None, row: int, edge: Edge, url: str
    ) -> None:
        self._own = self._read = 0
        self._slot = slot if table is not None else None
        self._table = table
        self._row = row
        self._edge = edge
        super().__init__(url)

    @property
    def in_flight(self) -> int:
        if self._slot is None:
            self._read = self._own
        else:
            self._read = self._table.total(self._slot)  # type: ignore[union-attr]
        return self._read

    @in_flight.setter
    def in_flight(self, count: int) -> None:
        was = self._own
        self._own = own = was + count - self._read
        self._read = count
        if self._slot is not None:
            self._table.set(self._row, self._slot, own)  # type: ignore[union-attr]
            if (was == 0) != (own == 0):
                self._edge(self._slot, own)

    @property
    def own(self) -> int:
        """This worker's requests on it."""
        return self._own

    @property
    def slot(self) -> int | None:
        """Its column in the in-flight table: how the control plane names it."""
        return self._slot


class RemoteStart:
    """An on-demand model in a worker: its state is the mirror's; a start or a wake is asked
    of the control plane, whose on-demand policy decides, queues and swaps. What the policy
    learns from requests goes there too: a request that asks for a start is counted by the
    control plane's ``ready()``; one that finds the model serving, and each one served, is
    counted in ``demand``, which tells them in batches."""

    def __init__(
        self,
        name: str,
        life: ModelLife,
        ask: Callable[[Message], Awaitable[Message]],
        demand: Demand,
    ):
        self.name = name
        self.life = life
        self._ask = ask
        self._demand = demand

    @property
    def state(self) -> BackendState:
        return self.life.state

    @property
    def serving(self) -> bool:
        return self.life.state is BackendState.READY

    async def ready(
        self, deadline: float | None = None, *, key: str | None = None, priority: int = 0
    ) -> float:
        if self.serving:
            self._demand.arrived(self.name, key, priority)
            return 0.0
        # The deadline travels as the seconds left: each process has its own clock.
        left = None if deadline is None else deadline - clock.now()
        ask = {"t": "ready", "model": self.name, "left": left, "key": key, "priority": priority}
        try:
            answer = await self._ask(ask)
        except ChannelClosed:
            raise ShuttingDown("The gateway is shutting down.", retry_after=1.0) from None
        if "failed" in answer:
            raise RemoteFailure(f"the control plane failed to start {self.name!r}")
        if (error := answer.get("error")) is not None:
            raise refused(error)
        waited: float = answer["waited"]
        return waited

    def want(self) -> None:
        """A request went to a fallback rather than wait: the control plane's ``want()``
        starts or wakes the model all the same (and counts the request), as in one process."""
        if not self.serving:
            self._demand.wanted(self.name)

    def served(self, seconds: float, tokens: int) -> None:
        self._demand.served(self.name, seconds, tokens)


class RemoteFailure(Exception):
    """The control plane raised something it does not expect (a bug, logged there); here it
    goes on to the worker's error boundary, as a 500."""


class Mirror:
    def __init__(
        self,
        table: InFlightTable | None,
        row: int,
        tell: Callable[[Message], None],
        ask: Callable[[Message], Awaitable[Message]],
    ) -> None:
        """``table``: the shared in-flight table (None: counts stay this worker's own);
        ``row``: this worker's row in it; ``tell``/``ask``: the channel to the control plane."""
        self.table = table
        self.row = row
        self._tell = tell
        self._ask = ask
        self.turns = Turns(tell, ask)  # in the control plane's queues
        self.demand = Demand(tell)  # requests to on-demand models, for the control plane
        self.routes = RouteTable([])
        self.pools: list[ReplicaPool] = []  # routed now, in order (metrics read this list)
        self._pools: dict[str, ReplicaPool] = {}
        self._replicas: dict[Any, MirrorReplica] = {}
        self.generation = 0

    def apply(self, document: Document, generation: int = 0) -> None:
        """The control plane's whole table, in place of the last: replicas and pools that are
        known already are updated (requests in flight hold them), new ones made."""
        seen: dict[Any, MirrorReplica] = {}
        routed: list[tuple[ReplicaPool, list[str]]] = []
        adapters: dict[str, list[str]] = {}
        for model in document["models"]:
            pool = self._pools.get(model["name"]) or self._new_pool(model)
            self._update_pool(pool, model)
            replicas = []
            for doc in model["replicas"]:
                key = doc["slot"] if doc["slot"] is not None else (model["name"], doc["url"])
                replica = self._replicas.get(key) or self._new_replica(doc)
                _update_replica(replica, doc)
                seen[key] = replica
                replicas.append(replica)
            pool.replicas[:] = replicas  # the life's list too: one list per model
            routed.append((pool, model["aliases"]))
            adapters[pool.name] = model["adapters"]
        self._replicas = seen
        self._pools = {pool.name: pool for pool, _ in routed}
        self.pools[:] = [pool for pool, _ in routed]
        self.routes.replace(routed, adapters)
        self.generation = generation
        for pool in self.pools:
            pool.life.changed.fire()  # type: ignore[union-attr]

    def _new_pool(self, model: Document) -> ReplicaPool:
        life = ModelLife(model["name"], [], on_demand=model["on_demand"])
        pool = ReplicaPool(model["name"], life.replicas, life=life)
        self._pools[pool.name] = pool
        return pool

    def _update_pool(self, pool: ReplicaPool, model: Document) -> None:
        life: ModelLife = pool.life  # type: ignore[assignment]
        state = BackendState(model["state"])
        if state is not life.state:
            life.state, life.state_since = state, time.monotonic()
        pool.policy = model["policy"]
        pool.affinity_header = model["affinity_header"].encode("latin-1")
        pool.hold_for = model["hold_for"]
        knobs = model["prefix"]
        if knobs is None:
            pool.prefix = None
        elif pool.prefix is None or pool.prefix.policy.block_bytes != knobs["block_bytes"]:
            pool.prefix = PrefixRouter(PrefixPolicy(**knobs))  # other blocks: other hashes
        elif asdict(pool.prefix.policy) != knobs:
            pool.prefix.policy = PrefixPolicy(**knobs)  # what it learnt stays, as in the plane
        if not model["on_demand"]:
            pool.on_demand = None
        elif not isinstance(pool.on_demand, RemoteStart):
            pool.on_demand = RemoteStart(pool.name, life, self._ask, self.demand)
        pool.priority_field = model["priority_field"]
        queue = model["queue"]
        if queue is None:
            pool.queue = None
        elif not isinstance(pool.queue, RemoteQueue):
            pool.queue = RemoteQueue(pool.name, self.turns, queue["capped"], _serves(pool, life))
        else:
            pool.queue.capped = queue["capped"]

    def _new_replica(self, doc: Document) -> MirrorReplica:
        return MirrorReplica(doc["slot"], self.table, self.row, self._edge, doc["url"])

    def _edge(self, slot: int, count: int) -> None:
        self._tell({"t": "busy" if count else "idle", "slot": slot})


def _serves(pool: ReplicaPool, life: ModelLife) -> Callable[[], bool]:
    """Whether the model serves, as its queue's gate: always, unless it is on demand."""
    return lambda: pool.on_demand is None or life.state is BackendState.READY


def _update_replica(replica: Replica, doc: Document) -> None:
    replica.url, replica.uds, replica.api_key = doc["url"], doc["uds"], doc["api_key"]
    state = BackendState(doc["state"])
    if state is not replica.state:
        replica.state, replica.state_since = state, time.monotonic()
    replica.ready_since = doc["ready_since"]  # the prefix index's epoch: the same clock
    replica.identity, replica.address = doc["identity"], doc["address"]
    replica.adapters = frozenset(doc["adapters"])
    replica.ejected_until = max(replica.ejected_until, doc["ejected_until"])
    after, seconds = doc["eject"]
    if (after, seconds) != (replica.ejection.after, replica.ejection.seconds):
        replica.ejection = Ejection(after, seconds)
    load = doc["load"]
    replica.load = VllmLoad(**load) if load is not None else None
