"""Replicas of one model and the choice between them.

A replica is one vLLM server. Its ``state`` has one writer, its model's life
(``backends.life``), which changes it through ``move`` along the transitions of
``backends.lifecycle``; the gateway reads it on every request. Everything here
runs on one event loop, so no lock guards it. Besides its state, a replica can be *ejected* for
a cool-down after failing requests (passive health checking), which takes it out of the choice
without waiting for a health check. A request holds a replica through a ``Lease``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from backends import clock, lifecycle
from backends.kv_cache import KvCache
from backends.lifecycle import ON_ITS_WAY, BackendState
from backends.prefix_index import PrefixRouter
from backends.signals import Signal

if TYPE_CHECKING:
    from backends.life import ModelLife
    from backends.on_demand_api import Startable
    from backends.queues import ModelQueue

Policy = Literal["least_outstanding", "vllm_metrics", "affinity", "prefix"]


@dataclass(frozen=True, slots=True)
class Ejection:
    """Passive health checking: after ``after`` failed requests in a row, out for ``seconds``."""

    after: int = 3
    seconds: float = 10.0


@dataclass(frozen=True, slots=True)
class VllmLoad:
    """What a vLLM server says about its own load, scraped off the request path."""

    running: float
    waiting: float
    kv_cache_usage: float  # 0..1
    prefix_cache_hits: float = 0.0  # prompt tokens found in its prefix cache, since it started
    prefix_cache_queries: float = 0.0  # prompt tokens looked up there

    @property
    def score(self) -> float:
        return self.running + 2 * self.waiting + 4 * self.kv_cache_usage

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries


@dataclass(eq=False)
class Replica:
    url: str
    api_key: str | None = None
    uds: str | None = None  # the unix socket it listens on instead of a TCP port (spawn mode)
    state: BackendState = BackendState.READY
    in_flight: int = 0
    ejection: Ejection = field(default_factory=Ejection)
    failures: int = 0  # failed requests in a row (refused, reset, 5xx)
    ejected_until: float = 0.0  # time.monotonic(); 0 when not ejected
    # What its watcher learnt, for /metrics and the status page.
    restarts: int = 0
    ready_since: float | None = None  # time.monotonic(), while ready
    state_since: float = field(default_factory=time.monotonic)
    last_done: float = 0.0  # clock.now() when its last request ended; an idle clock
    health_latency: float | None = None  # seconds, last health check
    gpus: tuple[int, ...] = ()
    load: VllmLoad | None = None  # from the replica's own /metrics (policy vllm_metrics)
    kv_cache: KvCache | None = None  # expected and actual, once a spawned server is ready
    adapters: frozenset[str] = frozenset()  # LoRA adapters it serves, from its /v1/models
    # What stays the same across its restarts, for the affinity hash: a spawned server's index
    # (its port changes); empty for a server the gateway connects to, whose URL is used.
    identity: str = ""
    address: str | None = None  # a discovered pod's `ip:port`, which also names it in metrics
    share: float = 0.0  # of each of its GPUs its server takes while running (spawn mode)
    went_idle: Signal = field(default_factory=Signal)  # fires when in_flight drops to 0

    @property
    def key(self) -> str:
        """Its identity for rendezvous hashing."""
        return self.identity or self.url

    @property
    def ready(self) -> bool:
        if self.state is not BackendState.READY:
            return False
        return not self.ejected_until or time.monotonic() >= self.ejected_until

    def move(self, to: BackendState) -> None:
        """The one way to change the state, called by its one writer (``backends.life``)."""
        lifecycle.check(self.state, to)
        if to is self.state:
            return
        now = time.monotonic()
        self.state, self.state_since = to, now
        self.ready_since = now if to is BackendState.READY else None

    def lease(self, pool: ReplicaPool) -> Lease:
        return Lease(self, pool)

    def note_failure(self) -> None:
        self.failures += 1
        if self.failures >= self.ejection.after:
            self.ejected_until = time.monotonic() + self.ejection.seconds

    def note_success(self) -> None:
        if self.failures:
            self.failures = 0
            self.ejected_until = 0.0


@dataclass(eq=False)
class ReplicaPool:
    """The replicas serving one model, under the model's canonical name."""

    name: str
    replicas: list[Replica] = field(default_factory=list)
    max_model_len: int | None = None
    open_streams: int = 0
    policy: Policy = "least_outstanding"
    affinity_header: bytes = b"x-session-id"  # lower case, as ASGI gives header names
    on_demand: Startable | None = None  # started by its first request, when set
    life: ModelLife | None = None  # the one writer of its replicas' states
    hold_for: float = 0.0  # seconds a request waits for a ready replica (a reload restarts it)
    prefix: PrefixRouter | None = None  # the prefix index, for policy prefix
    # The queue requests pass through (its life's), when the model caps its requests in
    # flight or starts on demand; None: they go straight on.
    queue: ModelQueue | None = None
    priority_field: bool = False  # its servers schedule by the body's `priority` (vLLM's)

    def pick(
        self,
        exclude: Collection[Replica] = (),
        affinity: str | None = None,
        adapter: str | None = None,
        prompt: Sequence[int] | None = None,
    ) -> Replica | None:
        """A ready replica by the pool's policy, or None if none is ready. With ``adapter``,
        only replicas that hold that LoRA adapter are chosen.

        least_outstanding: fewest requests in flight through this gateway.
        vllm_metrics: lowest vLLM-reported load (running + 2 waiting + 4 KV-cache use) plus
          this gateway's in-flight count, which also covers the time since the last scrape.
        affinity: the same session key always lands on the same replica while it is ready
          (rendezvous hashing, so losing a replica moves only its own sessions); requests
          without a key fall back to least_outstanding.
        prefix: the replica most likely to hold the longest prefix of ``prompt`` (its chained
          block hashes, ``backends.prefix_index``) unless it is loaded beyond the bound; requests
          without a prompt fall back to least_outstanding.
        """
        if adapter is not None:
            exclude = [*exclude, *(r for r in self.replicas if adapter not in r.adapters)]
        if self.policy == "affinity" and affinity is not None:
            return self._by_affinity(exclude, affinity)
        if self.prefix is not None and prompt is not None:
            return self.prefix.choose(self._ready(exclude), prompt, self.replicas)
        weigh = _with_vllm_load if self.policy == "vllm_metrics" else _in_flight
        best: Replica | None = None
        best_weight = 0.0
        for replica in self.replicas:
            if not replica.ready or replica in exclude:
                continue
            weight = weigh(replica)
            if best is None or weight < best_weight:
                best, best_weight = replica, weight
        return best

    def _ready(self, exclude: Collection[Replica]) -> list[Replica]:
        """The replicas that would take a request now, less ``exclude`` (``Replica.ready``,
        its common case inline: this runs for every request of a pool balanced by prefix)."""
        ready = BackendState.READY
        return [
            r
            for r in self.replicas
            if r.state is ready and (not r.ejected_until or r.ready) and r not in exclude
        ]

    def _by_affinity(self, exclude: Collection[Replica], key: str) -> Replica | None:
        # Hash on each replica's identity, not its place in the list: pods come and go.
        ready = [r for r in self.replicas if r.ready and r not in exclude]
        if not ready:
            return None
        return max(ready, key=lambda replica: _weight(key, replica.key))

    def forget(self, replica: Replica) -> None:
        """What ``replica``'s cache held is gone (it restarts, sleeps or leaves the pool); its
        life calls this on those moves. (A replica that becomes ready again is forgotten by
        the index on its own as well: ``backends.prefix_index``.)"""
        if self.prefix is not None:
            self.prefix.forget(replica)

    def labelled(self) -> list[tuple[str, Replica]]:
        """Each replica with the name metrics, the status page and `?replica=` give it: a
        discovered pod's address, else its index (stable, unlike a spawned server's port)."""
        return [(r.address or str(i), r) for i, r in enumerate(self.replicas)]

    def ready_for(self, adapter: str | None = None) -> bool:
        """Some replica would take a request now (for ``adapter``, if given)."""
        return any(r.ready and (adapter is None or adapter in r.adapters) for r in self.replicas)

    @property
    def adapters(self) -> frozenset[str]:
        """Every LoRA adapter some replica of this model serves."""
        return frozenset().union(*(r.adapters for r in self.replicas))

    @property
    def loading(self) -> bool:
        """True while no replica is ready yet but one is on its way (so clients should retry)."""
        return any(r.state in ON_ITS_WAY for r in self.replicas)


class Lease:
    """One request's hold on a replica, and on its pool's open streams once it streams:
    taken when the request is sent, given back exactly once (as the Rust router's
    WorkerLoadGuard does on drop), whichever way the request ends."""

    __slots__ = ("pool", "replica", "streaming")

    def __init__(self, replica: Replica, pool: ReplicaPool) -> None:
        self.replica: Replica | None = replica
        self.pool = pool
        self.streaming = False
        replica.in_flight += 1

    def stream(self) -> None:
        if not self.streaming and self.replica is not None:
            self.streaming = True
            self.pool.open_streams += 1

    def release(self) -> None:
        if self.replica is None:
            return
        replica = self.replica
        replica.in_flight -= 1
        replica.last_done = clock.now()
        if not replica.in_flight:
            replica.went_idle.fire()
        if self.streaming:
            self.pool.open_streams -= 1
        self.replica = None

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


def _in_flight(replica: Replica) -> float:
    return replica.in_flight


def _with_vllm_load(replica: Replica) -> float:
    load = replica.load
    return replica.in_flight + (load.score if load is not None else 0.0)


def _weight(key: str, replica: str) -> bytes:
    """Rendezvous-hash weight of a session on a replica (blake2b: evenly spread, and fast)."""
    return hashlib.blake2b(f"{key}|{replica}".encode(), digest_size=8).digest()
