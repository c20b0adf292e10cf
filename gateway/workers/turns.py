"""A model's queue as a worker sees it: the control plane's, asked for each request's turn.

A model with a queue (`models[].queue` with `max_in_flight`, or on demand) has one queue for
the whole gateway, the control plane's (``backends.queues``), so that `max_in_flight`,
`max_waiting`, `max_wait` and the order by priority, key and weight hold across workers. A
worker's relay admits its requests as one process does (``pool.queue.admit``); here that
asks the control plane for a turn over the channel:

    worker                                  control plane
    turn {model, n, priority, key, weight}  its queue's admit(); waits for the turn
                   <- up {n}                the model does not serve: this request's
    the request's own bring_up (its start,  ``bring_up`` runs where the request is (its
    within its deadline), answered          deadline, its trace, its start wait)
                   <- answer                the turn: a slot held for turn n
    done {n}                                the exchange closed: the slot goes back

A request that leaves while it waits cancels its ask (its place in the queue goes) and says
``done`` (a turn handed to it meanwhile goes back); the control plane gives back every slot
of a worker whose channel closed. A model with no `max_in_flight` lets every request go while
it serves, as its queue would: only while it does not serve is a turn asked for. A request
for an on-demand model that serves awaits its ``bring_up`` first, as one process's queue
does, which returns at once and counts the request's arrival (``gateway.workers.demand``).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from backends.errors import ShuttingDown
from backends.queues import BringUp, ModelQueue, Slot
from gateway.errors import GatewayError
from gateway.workers.channel import ChannelClosed, Message
from gateway.workers.refusals import refused


class RemoteSlot(Slot):
    """A turn the control plane holds for this request; ``release`` gives it back once."""

    __slots__ = ("_back",)

    def __init__(self, back: Callable[[], None] | None) -> None:
        """``back``: tells the control plane (None: nothing to give back)."""
        self._queue = None
        self.taken = time.monotonic()
        self._back = back

    def release(self) -> None:
        back, self._back = self._back, None
        if back is not None:
            back()


@dataclass(slots=True)
class _Asking:
    bring_up: BringUp | None
    failure: GatewayError | None = None  # what its bring_up raised, for the request


class Turns:
    """This worker's requests waiting for a turn in one of the control plane's queues."""

    def __init__(
        self, tell: Callable[[Message], None], ask: Callable[[Message], Awaitable[Message]]
    ) -> None:
        self._tell = tell
        self._ask = ask
        self._numbers = itertools.count(1)
        self._asking: dict[int, _Asking] = {}

    async def take(
        self, model: str, priority: int, key: str, weight: float, bring_up: BringUp | None
    ) -> Slot:
        number = next(self._numbers)
        asking = self._asking[number] = _Asking(bring_up)
        ask = {
            "t": "turn",
            "model": model,
            "n": number,
            "priority": priority,
            "key": key,
            "weight": weight,
            "up": bring_up is not None,
        }
        try:
            answer = await self._ask(ask)
        except ChannelClosed:
            raise ShuttingDown("The gateway is shutting down.", retry_after=1.0) from None
        except asyncio.CancelledError:
            self._tell({"t": "done", "n": number})  # a turn given to it meanwhile goes back
            raise
        finally:
            del self._asking[number]
        if "failed" in answer:
            raise RemoteQueueFailure(f"the control plane failed to queue a request for {model!r}")
        if (error := answer.get("error")) is not None:
            raise refused(error)
        if "down" in answer:  # its bring_up refused it; its own error, as it was raised
            if asking.failure is not None:
                raise asking.failure
            raise RemoteQueueFailure(f"the start of {model!r} failed at this worker")
        if "free" in answer:  # the model has no queue now (a reload took it away)
            return RemoteSlot(None)
        return RemoteSlot(lambda: self._tell({"t": "done", "n": number}))

    async def bring_up(self, number: int) -> Message:
        """The control plane's queue needs turn ``number``'s model to serve: the request's own
        ``bring_up`` (a start asked of the control plane, within the request's deadline)."""
        asking = self._asking.get(number)
        if asking is None or asking.bring_up is None:
            return {"down": True}  # it left meanwhile
        try:
            await asking.bring_up()
        except GatewayError as exc:  # refused (its deadline, a failed start): the request's
            asking.failure = exc
            return {"down": True}
        return {"up": True}


class RemoteQueue(ModelQueue):
    """A model's queue in a worker: turns are the control plane's (``Turns``); nothing
    waits here."""

    def __init__(self, name: str, turns: Turns, capped: bool, gate: Callable[[], bool] | None):
        """``capped``: its queue has a `max_in_flight`; ``gate``: whether the model serves
        (the mirror's state)."""
        super().__init__(name, gate=gate)
        self.turns = turns
        self.capped = capped

    async def admit(
        self,
        priority: int = 0,
        key: str = "",
        weight: float = 1.0,
        bring_up: BringUp | None = None,
    ) -> Slot:
        if bring_up is not None and self.serving:
            # At once (it serves): the request's arrival is counted, as one process's queue
            # counts it by awaiting its bring_up once (``RemoteStart.ready``).
            await bring_up()
        if not self.capped and self.serving:  # no cap: a model that serves holds none back
            return RemoteSlot(None)
        return await self.turns.take(self.name, priority, key, weight, bring_up)


class RemoteQueueFailure(Exception):
    """The control plane raised something it does not expect (a bug, logged there); here it
    goes on to the worker's error boundary, as a 500."""
