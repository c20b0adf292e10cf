"""One model's queue: which requests may go to its servers now, and in which order the rest follow.

Every model has one, kept by its life (``backends.life``). A request asks for a slot
(``admit``) and holds it until its answer has ended (``Slot.release``, beside the lease's
release); beyond `max_in_flight` slots it waits, and the waiters go in this order:

    priority   the lowest value first (vLLM's sense, so its own scheduler agrees)
    key        fair between API keys within one priority: weighted round robin (stride
               scheduling: a key of weight 2 goes twice for each turn of a key of weight 1;
               a key that was idle joins at the current round, with no credit saved up)
    arrival    first come, first served within one key

Slots may be kept for the better priorities (`reserved`): a request of a priority worse than
one that keeps slots goes only while those it keeps, less what requests of it and better
priorities hold, stay free beside it. Without, an interactive request that finds every slot
taken by batch ones goes first, but still waits for one of them to end: up to a whole batch
request's time (docs/traffic.md).

The queue is bounded: beyond `max_waiting` waiters a request is refused at once
(``QueueFull``), and one that waited `max_wait` seconds is refused then (``QueueTimeout``);
both say when to retry. While its model does not serve (an on-demand model stopped,
starting, waking or draining: the life's ``gate``), no waiter gets a slot: each waits in its
``bring_up`` (the start or wake, shared by all) and then for its turn, so the start queue and
the slot queue are one queue with one bound, and a start hands out its slots in order.

Waiting is on futures, never on a clock: a release, an arrival, a new limit or the model
coming up hands out free slots at once; a waiter whose client left leaves at once.
``waiters()`` is the read-only view of who waits for what (for the swaps, the status page).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import count

from backends.errors import QueueFull, QueueTimeout

HOLD_ALPHA = 0.2  # weight of the latest slot's hold time in the moving average
MAX_RETRY_AFTER = 60.0  # seconds: the longest wait a refusal tells a client
DEFAULT_MAX_WAITING = 256
BringUp = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """`models[].queue`; None: no limit. The defaults hold nothing back on a model that
    serves (no in-flight cap) and bound the wait for an on-demand start, as before queues."""

    max_in_flight: int | None = None
    max_waiting: int | None = DEFAULT_MAX_WAITING
    max_wait: float | None = None  # seconds from arrival to its turn, a start included
    retry_after_starting: float = 10.0  # Retry-After while the model does not serve
    # (priority, slots): that many of max_in_flight are kept for requests of that priority
    # or a better one; the priorities in order, their slots growing
    reserved: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class WaiterView:
    """One waiting request, as others may see it."""

    priority: int
    key: str
    enqueued: float  # time.monotonic()
    deadline: float | None  # time.monotonic() when it is refused, if it has not gone by then
    admitted: bool  # it holds a slot already: it goes once its model serves


class Slot:
    """One request's place among the model's `max_in_flight`: given back exactly once."""

    __slots__ = ("_queue", "priority", "taken")

    def __init__(self, queue: ModelQueue, priority: int) -> None:
        self._queue: ModelQueue | None = queue
        self.priority = priority
        self.taken = time.monotonic()

    def release(self) -> None:
        queue, self._queue = self._queue, None
        if queue is not None:
            queue._released(self)


class _Waiter:
    __slots__ = ("_wake", "deadline", "enqueued", "key", "priority", "queued", "slot", "weight")

    def __init__(self, priority: int, key: str, weight: float, max_wait: float | None) -> None:
        self.priority = priority
        self.key = key
        self.weight = weight
        self.enqueued = time.monotonic()
        self.deadline = None if max_wait is None else self.enqueued + max_wait
        self.queued = True  # in its level, waiting for a slot
        self.slot: Slot | None = None
        self._wake: asyncio.Future[None] | None = None

    async def sleep(self) -> None:
        """Until ``wake``: a slot was handed to it, or its model stopped serving."""
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)


class _Level:
    """The waiters of one priority, in a FIFO per key; keys take turns by stride scheduling:
    each key has a pass, the key with the lowest goes next and its pass grows by
    1/weight; ``clock`` is the pass of the last one served."""

    __slots__ = ("clock", "heap", "keys", "passes")

    def __init__(self) -> None:
        self.keys: dict[str, deque[_Waiter]] = {}  # keys with waiters only
        self.heap: list[tuple[float, int, str]] = []  # (pass, arrival, key): one per key
        self.passes: dict[str, float] = {}
        self.clock = 0.0

    def push(self, waiter: _Waiter, seq: int) -> None:
        fifo = self.keys.get(waiter.key)
        if fifo is None:
            fifo = self.keys[waiter.key] = deque()
            start = max(self.passes.get(waiter.key, 0.0), self.clock)  # no credit for idling
            self.passes[waiter.key] = start
            heapq.heappush(self.heap, (start, seq, waiter.key))
        fifo.append(waiter)

    def pop(self, seq: int) -> _Waiter:
        turn, _, key = heapq.heappop(self.heap)
        fifo = self.keys[key]
        waiter = fifo.popleft()
        self.clock = turn
        self.passes[key] = turn + 1.0 / waiter.weight
        if fifo:
            heapq.heappush(self.heap, (self.passes[key], seq, key))
        else:
            del self.keys[key]
        return waiter

    def remove(self, waiter: _Waiter) -> None:
        fifo = self.keys[waiter.key]
        fifo.remove(waiter)
        if not fifo:
            del self.keys[waiter.key]
            self.heap = [entry for entry in self.heap if entry[2] != waiter.key]
            heapq.heapify(self.heap)


class ModelQueue:
    def __init__(
        self,
        name: str,
        limits: QueueLimits | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        """``gate``: whether the model serves now (None: always); its owner calls
        ``gate_changed`` whenever the answer may have changed."""
        self.name = name
        self.limits = limits or QueueLimits()
        self.in_flight = 0  # slots held
        self._held: dict[int, int] = {}  # slots held, by priority (those holding some)
        self.refused = {"queue_full": 0, "queue_timeout": 0}  # requests refused, by reason
        self._gate = gate
        self._levels: dict[int, _Level] = {}  # priorities with waiters only
        self._members: dict[_Waiter, None] = {}  # every waiter, in arrival order
        self._queued = 0  # waiters without a slot
        self._seq = count()
        self._hold = 0.0  # moving average of the seconds a slot is held

    # What requests do.

    async def admit(
        self,
        priority: int = 0,
        key: str = "",
        weight: float = 1.0,
        bring_up: BringUp | None = None,
    ) -> Slot:
        """A slot, once it is this request's turn; QueueFull or QueueTimeout if it may not wait.

        ``bring_up``: what makes the model serve (an on-demand start or wake), awaited
        whenever it does not, shared by every waiter; when given it is awaited at least
        once (it returns at once when the model serves). A caller that is cancelled (its
        client left) leaves the queue, and a slot it was handed goes to the next.
        """
        if bring_up is None and (slot := self.admit_now(priority)) is not None:
            return slot
        waiter = self._join(priority, key, weight)
        max_wait = self.limits.max_wait
        try:
            async with asyncio.timeout(max_wait):
                while True:
                    if bring_up is not None:
                        await bring_up()
                    slot = waiter.slot
                    if slot is not None and (bring_up is None or self.serving):
                        waiter.slot = None
                        return slot
                    if slot is None:
                        await waiter.sleep()
        except TimeoutError:
            self.refused["queue_timeout"] += 1
            raise QueueTimeout(
                f"Model {self.name!r} is overloaded: this request waited {max_wait:g}s "
                "(max_wait) for its turn; retry later.",
                retry_after=self.retry_after(),
            ) from None
        finally:
            self._leave(waiter)

    def admit_now(self, priority: int = 0) -> Slot | None:
        """A slot at once, if one is free for ``priority``, nobody of it or a better one waits
        ahead and the model serves; None: the request must ``admit`` (and wait)."""
        return self._take(priority) if self._free(priority) else None

    # What its owner does.

    def configure(self, limits: QueueLimits) -> None:
        """New limits, at once (a reload): waiters keep their deadlines; a higher
        `max_in_flight` lets waiters go now, a lower one lets requests in flight finish."""
        self.limits = limits
        self._dispatch()

    def gate_changed(self) -> None:
        """The model may have begun or stopped serving: hand out slots, or send the waiters
        without one back to their ``bring_up``."""
        if self.serving:
            self._dispatch()
            return
        for waiter in self._members:
            if waiter.queued:
                waiter.wake()

    # What others read.

    @property
    def serving(self) -> bool:
        return self._gate is None or self._gate()

    @property
    def waiting(self) -> int:
        """Requests in the queue: waiting for their model to serve, or for their turn."""
        return len(self._members)

    def waiters(self) -> tuple[WaiterView, ...]:
        """Who waits, in arrival order (a copy: nothing here changes the queue)."""
        return tuple(
            WaiterView(w.priority, w.key, w.enqueued, w.deadline, w.slot is not None)
            for w in self._members
        )

    def retry_after(self) -> float:
        """Seconds a refused client is told to wait: while the model does not serve, what
        the config says; else how long the waiters ahead take, by the recent hold times."""
        if not self.serving:
            return self.limits.retry_after_starting
        cap = self.limits.max_in_flight or 1
        return min(MAX_RETRY_AFTER, max(1.0, (self._queued + 1) * self._hold / cap))

    # Inside.

    def _free(self, priority: int) -> bool:
        """A request of ``priority`` may go at once: nobody of its priority or a better one
        waits, and a slot is free for it."""
        ahead = self._queued > 0 and min(self._levels) <= priority
        return not ahead and self._room(priority) and self.serving

    def _room(self, priority: int) -> bool:
        """A slot is free for a request of ``priority``: below the cap, with what each better
        priority keeps (less what requests of it and better ones hold) left free beside it."""
        cap = self.limits.max_in_flight
        if cap is None:
            return True
        kept = 0
        for better, slots in self.limits.reserved:
            if better >= priority:
                break
            holding = sum(n for held, n in self._held.items() if held <= better)
            kept = max(kept, slots - holding)
        return self.in_flight + kept < cap

    def _take(self, priority: int) -> Slot:
        self.in_flight += 1
        self._held[priority] = self._held.get(priority, 0) + 1
        return Slot(self, priority)

    def _join(self, priority: int, key: str, weight: float) -> _Waiter:
        limits = self.limits
        full = limits.max_waiting is not None and self.waiting >= limits.max_waiting
        if full and not self._free(priority):  # one that goes at once is no waiter
            self.refused["queue_full"] += 1
            raise QueueFull(
                f"Model {self.name!r} is overloaded: {self.waiting} requests already wait "
                "for it (max_waiting); retry later.",
                retry_after=self.retry_after(),
            )
        waiter = _Waiter(priority, key, weight, limits.max_wait)
        self._members[waiter] = None
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = _Level()
        level.push(waiter, next(self._seq))
        self._queued += 1
        self._dispatch()
        return waiter

    def _dispatch(self) -> None:
        """Free slots to the waiters whose turn it is, while the model serves (where the
        best priority waiting may not take a slot, no worse one may)."""
        while self._queued and self.serving:
            priority = min(self._levels)
            if not self._room(priority):
                break
            level = self._levels[priority]
            waiter = level.pop(next(self._seq))
            if not level.keys:
                del self._levels[priority]  # its fairness books close with it
            self._queued -= 1
            waiter.queued = False
            waiter.slot = self._take(priority)
            waiter.wake()

    def _leave(self, waiter: _Waiter) -> None:
        """The waiter goes (with its slot), gives up, or was refused."""
        self._members.pop(waiter, None)
        if waiter.queued:
            waiter.queued = False
            self._queued -= 1
            level = self._levels[waiter.priority]
            level.remove(waiter)
            if not level.keys:
                del self._levels[waiter.priority]
        elif waiter.slot is not None:  # handed a slot it will not use
            slot, waiter.slot = waiter.slot, None
            slot.release()

    def _released(self, slot: Slot) -> None:
        self.in_flight -= 1
        left = self._held[slot.priority] - 1
        if left:
            self._held[slot.priority] = left
        else:
            del self._held[slot.priority]
        held = time.monotonic() - slot.taken
        self._hold = held if not self._hold else self._hold + HOLD_ALPHA * (held - self._hold)
        if self._queued:
            self._dispatch()
