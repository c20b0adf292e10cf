"""vLLM's KV-cache events (``--kv-events-config``), so the prefix index forgets when a replica
does.

vLLM publishes, on a ZMQ PUB socket, one message per engine step that changed its cache:
three frames (topic, an 8-byte big-endian sequence number, a msgpack payload). The payload is
an ``EventBatch`` encoded as an array ``[ts, events, data_parallel_rank]``; each event is a map
tagged by ``type``: ``BlockStored`` (``block_hashes``, ``parent_block_hash``, ``token_ids``,
``block_size``, ``lora_name``, ``medium``...), ``BlockRemoved`` (``block_hashes``, ``medium``)
and ``AllBlocksCleared`` (vllm/distributed/kv_events.py, 0.32).

vLLM's block hashes are over token ids, the gateway's over bytes (it has no tokenizer), so the
two cannot be matched block for block; what the events do give is *when* the replica's cache
lets go: ``AllBlocksCleared`` forgets the replica, and ``BlockRemoved`` evicts the same
fraction of the gateway's table for it as vLLM evicted of the blocks it held, oldest first,
as vLLM's own LRU does. So the index follows the cache's real pressure, not a size estimate.

pyzmq and msgspec come with vLLM but are not the gateway's own dependencies (a gateway in
connect mode runs without vLLM installed): they are the ``kv-events`` extra, imported only
when a model subscribes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from backends.life import ModelLife
from backends.pool import Replica, ReplicaPool

log = logging.getLogger("vllm_gateway.kv_events")


@dataclass(frozen=True, slots=True)
class CacheChange:
    """What one batch of events did to a replica's cache, in vLLM's blocks."""

    stored: int = 0
    removed: int = 0
    cleared: bool = False  # all blocks were dropped (before ``stored`` of this batch)


def parse_batch(payload: bytes) -> CacheChange:
    """One published payload; events of other kinds and fields are left out."""
    import msgspec

    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a msgpack payload: {exc}") from None
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch: expected [ts, events, ...]")
    stored = removed = 0
    cleared = False
    for event in batch[1]:
        kind, hashes = _kind(event), _hashes(event)
        if kind == "BlockStored":
            stored += hashes
        elif kind == "BlockRemoved":
            removed += hashes
        elif kind == "AllBlocksCleared":
            cleared, stored, removed = True, 0, 0
    return CacheChange(stored, removed, cleared)


def _kind(event: Any) -> str | None:
    if isinstance(event, dict):
        kind = event.get("type")
    elif isinstance(event, list) and event:  # array-like encoding: the tag comes first
        kind = event[0]
    else:
        return None
    return kind if isinstance(kind, str) else None


def _hashes(event: Any) -> int:
    hashes = event.get("block_hashes") if isinstance(event, dict) else None
    return len(hashes) if isinstance(hashes, list) else 0


class CacheTracker:
    """One replica's cache as its events tell it: how many blocks it holds, and what to do to
    the index when it lets some go (``evict(fraction)``, ``forget()``)."""

    def __init__(self, evict: Callable[[float], None], forget: Callable[[], None]) -> None:
        self.held = 0
        self.batches = 0  # applied so far
        self._evict = evict
        self._forget = forget

    def apply(self, change: CacheChange) -> None:
        if change.cleared:
            self.held = 0
            self._forget()
        if change.removed:
            # Events missed before the subscription make `held` short: at most everything goes.
            fraction = min(1.0, change.removed / max(self.held, change.removed))
            self._evict(fraction)
            self.held = max(0, self.held - change.removed)
        self.held += change.stored
        self.batches += 1


class KvEventSubscriber:
    """Reads one replica's events from ``endpoint`` until stopped. The gateway connects to
    it: vLLM binds its publisher's endpoint (`ipc://`, or `tcp://*:PORT` on its own host),
    and ZMQ connects again by itself whenever the server comes back (a restart, a new
    gateway adopting it)."""

    def __init__(self, endpoint: str, tracker: CacheTracker, label: str) -> None:
        self.endpoint = endpoint
        self.tracker = tracker
        self.label = label
        self.receiving = asyncio.Event()  # set by the first message
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"kv-events:{self.label}")

    def cancel(self) -> None:
        """Stop without waiting: its socket closes as its task ends."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        context = zmq.asyncio.Context.instance()
        socket = context.socket(zmq.SUB)
        try:
            socket.setsockopt(zmq.IPV6, 1)  # a discovered pod's address may be one
            socket.connect(self.endpoint)
            socket.setsockopt(zmq.SUBSCRIBE, b"")
            frames = await socket.recv_multipart()
            log.info("%s: KV-cache events arriving from %s", self.label, self.endpoint)
            self.receiving.set()
            while True:
                if len(frames) == 3:  # replay markers have other shapes
                    self._apply(frames[2])
                frames = await socket.recv_multipart()
        finally:
            socket.close(linger=0)

    def _apply(self, payload: bytes) -> None:
        try:
            self.tracker.apply(parse_batch(payload))
        except ValueError as exc:
            log.warning("%s: a KV event batch was not understood: %s", self.label, exc)


# The KV-event endpoint a replica publishes on, if it does (a model's config decides).
Endpoints = Callable[[Replica], str | None]


class KvEventFeeds:
    """The subscribers that feed `balance: prefix` pools' indexes with their replicas'
    KV-cache events, one per replica that publishes: a pool's follow its members as its life
    changes them (a reload's new replicas, discovered pods joining and leaving, a server's
    new address after a restart), until the pool is unfollowed. Without pyzmq or msgspec,
    none runs (one warning)."""

    def __init__(self) -> None:
        self._follows: dict[str, _Follow] = {}
        self._started = False
        self._usable: bool | None = None

    def follow(self, pool: ReplicaPool, life: ModelLife, endpoints: Endpoints) -> None:
        """Feed ``pool``'s index from each of its replicas ``endpoints`` names an endpoint
        for, now and as they change; a second call for the same pool replaces the first."""
        old = self._follows.pop(pool.name, None)
        follow = self._follows[pool.name] = _Follow(pool, life, endpoints)
        if old is not None:
            follow.adopt(old)  # the subscribers whose endpoint stays go on
        if self._started and self._available():
            follow.start()

    async def unfollow(self, name: str) -> None:
        follow = self._follows.pop(name, None)
        if follow is not None:
            await follow.stop()

    def endpoints(self, name: str) -> dict[Replica, str]:
        """The replicas of pool ``name`` subscribed to now, and where."""
        follow = self._follows.get(name)
        return {r: s.endpoint for r, s in follow.subscribers.items()} if follow else {}

    def start(self) -> None:
        self._started = True
        if not self._follows or not self._available():
            return
        for follow in self._follows.values():
            follow.start()

    def _available(self) -> bool:
        if self._usable is None:
            try:
                import msgspec  # noqa: F401
                import zmq  # noqa: F401
            except ImportError:
                log.warning(
                    "KV-cache events were asked for but pyzmq or msgspec is missing (install "
                    "the gateway's `kv-events` extra); the prefix index guesses from routing "
                    "alone"
                )
                self._usable = False
            else:
                self._usable = True
        return self._usable

    async def stop(self) -> None:
        for follow in list(self._follows.values()):
            await follow.stop()


class _Follow:
    """One pool's subscribers, kept equal to what ``endpoints`` says of its members."""

    def __init__(self, pool: ReplicaPool, life: ModelLife, endpoints: Endpoints) -> None:
        self.pool = pool
        self.life = life
        self.endpoints = endpoints
        self.subscribers: dict[Replica, KvEventSubscriber] = {}
        self._task: asyncio.Task[None] | None = None

    def adopt(self, old: _Follow) -> None:
        if old._task is not None:
            old._task.cancel()  # it only waits for changes: nothing to finish
        self.subscribers = old.subscribers

    def start(self) -> None:
        self._sync()
        self._task = asyncio.create_task(self._run(), name=f"kv-events:{self.pool.name}")

    async def _run(self) -> None:
        while True:
            await self.life.changed.wait()
            self._sync()

    def _sync(self) -> None:
        wanted = {r: e for r in self.pool.replicas if (e := self.endpoints(r)) is not None}
        for replica, subscriber in list(self.subscribers.items()):
            if wanted.get(replica) != subscriber.endpoint:
                del self.subscribers[replica]
                subscriber.cancel()
        for replica, endpoint in wanted.items():
            if replica not in self.subscribers:
                tracker = CacheTracker(
                    partial(_evict, self.pool, replica), partial(_forget, self.pool, replica)
                )
                subscriber = KvEventSubscriber(endpoint, tracker, f"{self.pool.name}:{endpoint}")
                subscriber.start()
                self.subscribers[replica] = subscriber

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for subscriber in self.subscribers.values():
            await subscriber.stop()
        self.subscribers = {}


def _evict(pool: ReplicaPool, replica: Replica, fraction: float) -> None:
    if pool.prefix is not None:  # the pool's index as it is now: a reload may replace it
        pool.prefix.evict(replica, fraction)


def _forget(pool: ReplicaPool, replica: Replica) -> None:
    if pool.prefix is not None:
        pool.prefix.forget(replica)
