"""One model's life: the only writer of its state and of its replicas' states.

Whatever learns something about a model (the process supervisor, the health checker,
discovery, the on-demand policy and its swaps, the admin API) asks its life for a move and
waits for the outcome; nothing else writes a state or the list of replicas. The life applies
the moves one at a time, in the order they were asked, from one task reading one inbox (as
llama-swap gives each process one goroutine; here the task ends whenever the inbox is empty),
each checked against ``backends.lifecycle`` and each a compare-and-swap: a move asked *from*
states the target has left already is not made, and the answer is the state it is in now. So
no caller acts on a state it read before an await.

The life also decides what no single writer can see: a replica of an on-demand model that dies
while the model is being unloaded is stopped, not restarted (``after_death``), so the model's
GPU books (``backends.swaps``) count what its servers really hold.

Waiting for a state, or for requests to drain, is waiting on the life's signals. The life
also keeps the model's queue (``backends.queues``): requests wait there for their turn, and
an on-demand model's queue hands out turns only while the model is ready.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

from backends import clock, lifecycle
from backends.lifecycle import UNLOADING, BackendState, Level
from backends.pool import Replica
from backends.queues import ModelQueue
from backends.signals import Signal

S = BackendState


@dataclass(frozen=True, slots=True)
class _Move:
    to: BackendState
    replica: Replica | None  # None: the model itself
    expected: frozenset[BackendState] | None  # None: from any state the table allows


@dataclass(frozen=True, slots=True)
class _Join:
    replica: Replica


@dataclass(frozen=True, slots=True)
class _Remove:
    replica: Replica


@dataclass(frozen=True, slots=True)
class _AfterDeath:
    replica: Replica


_Event = _Move | _Join | _Remove | _AfterDeath


class ModelLife:
    def __init__(
        self,
        name: str,
        replicas: list[Replica] | None = None,
        *,
        on_demand: bool = False,
    ) -> None:
        """``replicas``: the model's pool shares this list; only the life changes it. An
        on-demand model starts stopped, an always-on one is ready as a model from the start
        (its replicas say whether they serve)."""
        self.name = name
        self.replicas: list[Replica] = replicas if replicas is not None else []
        self.on_demand = on_demand
        self.state = S.STOPPED if on_demand else S.READY
        self.state_since = clock.now()
        self.changed = Signal()  # fires after every move this life makes
        serves = (lambda: self.state is S.READY) if on_demand else None
        self.queue = ModelQueue(name, gate=serves)  # its limits: the config's (gateway)
        # Until every other reader of these states has seen the latest move: set where other
        # processes pick replicas too (``gateway.workers``), so that a drain counts the
        # requests they sent before they saw a replica leave the choice.
        self.settle: Callable[[], Awaitable[None]] | None = None
        self._inbox: deque[tuple[_Event, asyncio.Future[BackendState]]] = deque()
        self._task: asyncio.Task[None] | None = None  # runs while the inbox holds moves

    # What others ask. Each returns the state its target is in once the life has answered.

    async def move(
        self,
        to: BackendState,
        replica: Replica | None = None,
        *,
        expected: Iterable[BackendState] | None = None,
    ) -> BackendState:
        """Move ``replica`` (None: the model) to ``to``, if it is in one of ``expected``."""
        allowed = frozenset(expected) if expected is not None else None
        return await self._ask(_Move(to, replica, allowed))

    async def join(self, replica: Replica) -> BackendState:
        """A new member (a discovered pod): in the choice once its state says so."""
        return await self._ask(_Join(replica))

    async def remove(self, replica: Replica) -> BackendState:
        """A member leaves for good (a pod gone from DNS, once drained): stopped, then gone."""
        return await self._ask(_Remove(replica))

    async def after_death(self, replica: Replica) -> BackendState:
        """Its server died and was cleaned up: `restarting` if it is to come back, `stopped`
        if its model is being unloaded (then nobody restarts it)."""
        return await self._ask(_AfterDeath(replica))

    # Waiting.

    async def until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Wait until ``condition()`` holds after some move (at once if it holds now); False
        if ``timeout`` seconds passed first."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    await self.changed.wait()
        except TimeoutError:
            return condition()
        return True

    async def drained(
        self, replicas: Collection[Replica] | None = None, timeout: float | None = None
    ) -> bool:
        """Wait until no request is in flight on ``replicas`` (default: all of the model's);
        False if ``timeout`` seconds passed first. Woken by each lease's release."""
        chosen = self.replicas if replicas is None else replicas
        try:
            async with asyncio.timeout(timeout):
                if self.settle is not None:
                    await self.settle()
                while busy := next((r for r in chosen if r.in_flight), None):
                    await busy.went_idle.wait()
        except TimeoutError:
            return not any(r.in_flight for r in chosen)
        return True

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    async def close(self) -> None:
        """Once every move asked for has been made."""
        if self._task is not None:
            await asyncio.shield(self._task)

    # The one writer.

    async def _ask(self, event: _Event) -> BackendState:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[BackendState] = loop.create_future()
        self._inbox.append((event, answer))
        if self._task is None or self._task.done():  # it ends whenever the inbox is empty
            self._task = loop.create_task(self._run(), name=f"life:{self.name}")
        return await asyncio.shield(answer)  # a caller that leaves does not undo the move

    async def _run(self) -> None:
        while self._inbox:
            event, answer = self._inbox.popleft()
            try:
                answer.set_result(self._apply(event))
            except Exception as exc:  # not handled here: raised where it was asked (an
                answer.set_exception(exc)  # invalid transition is the asker's bug)

    def _apply(self, event: _Event) -> BackendState:
        if isinstance(event, _Join):
            if event.replica not in self.replicas:
                self.replicas.append(event.replica)
            self.changed.fire()
            return event.replica.state
        if isinstance(event, _Remove):
            self._set(event.replica, S.STOPPED)
            if event.replica in self.replicas:
                self.replicas.remove(event.replica)
            self.changed.fire()
            return S.STOPPED
        if isinstance(event, _AfterDeath):
            to = S.STOPPED if self.on_demand and self.state in UNLOADING else S.RESTARTING
            self._set(event.replica, to)
            return event.replica.state
        current = self.state if event.replica is None else event.replica.state
        if event.expected is not None and current not in event.expected:
            return current  # the compare failed: nothing moves
        if event.replica is None:
            self._set_model(event.to)
            return self.state
        self._set(event.replica, event.to)
        return event.replica.state

    def _set(self, replica: Replica, to: BackendState) -> None:
        replica.move(to)  # checks the table
        self.changed.fire()

    def _set_model(self, to: BackendState) -> None:
        lifecycle.check(self.state, to, Level.MODEL)
        if to is not self.state:
            self.state, self.state_since = to, clock.now()
            self.queue.gate_changed()
        self.changed.fire()
