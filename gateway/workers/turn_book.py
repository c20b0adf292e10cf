"""The control plane's side of its workers' queue turns (``gateway.workers.turns``).

A worker's ``turn`` request waits in the model's own queue (``backends.queues``), with the
priority, key and weight the worker read from the request, beside the control plane's own
waiters; when the model does not serve, the queue's ``bring_up`` asks the worker to bring it
up for that request (``up``: the request's own start, within its own deadline). A turn given
is held here, by worker and number, until the worker says ``done`` or its channel closes.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from backends.errors import Unavailable
from backends.on_demand_api import Startable
from backends.pool import ReplicaPool
from backends.queues import Slot
from gateway.workers.channel import Message
from gateway.workers.refusals import refusal

Ask = Callable[[Message], Awaitable[Message]]


class _BroughtDown(Exception):
    """The worker's bring_up refused its request (it keeps the error to raise there)."""


class TurnBook:
    def __init__(self, pools: Callable[[], list[ReplicaPool]], push: Callable[[], None]) -> None:
        """``pools``: the control plane's, now; ``push``: its document to every worker."""
        self._pools = pools
        self._push = push
        self._held: dict[object, dict[int, Slot]] = {}  # by worker (its link), by number

    def holding(self, worker: object) -> int:
        """Turns ``worker``'s requests hold now."""
        return len(self._held.get(worker, {}))

    def now(self, worker: object, message: Message) -> Message | None:
        """A ``turn`` answered at once: the model serves and a slot is free with nobody ahead
        (None: it waits, in ``turn``)."""
        pool = next((p for p in self._pools() if p.name == message["model"]), None)
        if pool is None or pool.queue is None:
            return {"free": True}
        if pool.on_demand is not None and not pool.on_demand.serving:
            return None
        slot = pool.queue.admit_now(message["priority"])
        if slot is None:
            return None
        self._held.setdefault(worker, {})[message["n"]] = slot
        return {}

    async def turn(self, worker: object, ask: Ask, message: Message) -> Message:
        """``message``: a worker's ``turn`` request; ``ask``: its channel's, for ``up``."""
        pool = next((p for p in self._pools() if p.name == message["model"]), None)
        queue = pool.queue if pool is not None else None
        if queue is None:
            return {"free": True}  # gone, or without a queue since a reload
        number = message["n"]
        model = pool.on_demand if pool is not None else None
        up = None
        if model is not None and message["up"]:
            up = functools.partial(self._bring_up, ask, number, model)
        try:
            slot = await queue.admit(message["priority"], message["key"], message["weight"], up)
        except Unavailable as exc:
            return {"error": refusal(exc)}
        except _BroughtDown:
            return {"down": True}
        self._held.setdefault(worker, {})[number] = slot
        return {}

    async def _bring_up(self, ask: Ask, number: int, model: Startable) -> None:
        if model.serving:
            return
        self._push()  # the worker learns that it does not serve before it is asked to start it
        answer = await ask({"t": "up", "n": number})
        if "up" not in answer:
            raise _BroughtDown

    def done(self, worker: object, number: int) -> None:
        """The worker's exchange closed (or its request left): the turn goes back."""
        held = self._held.get(worker)
        slot = held.pop(number, None) if held is not None else None
        if slot is not None:
            slot.release()

    def drop(self, worker: object) -> None:
        """The worker's channel closed: every turn it held goes back."""
        for slot in self._held.pop(worker, {}).values():
            slot.release()
