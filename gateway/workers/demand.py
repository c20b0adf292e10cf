"""A worker's requests to on-demand models, told to the control plane in batches.

In one process every request passes through its on-demand model's ``ready()``, which counts
its arrival (the model's demand, the keys and priorities that asked for it: what the swap
scheduler weighs), and, once served, through ``served()`` (its service rate). In a worker a
request asks the control plane only when its model does not serve (``ready``, counted
there, once); the rest are counted here and told in one ``demand`` notice for every model,
each time as an age (the seconds before the notice: each process has its own clock). The
control plane counts them as its own (``OnDemandModel.noted``).

When they are told: consecutive notices are ``TELL_EVERY`` apart at least; an arrival after
a quiet spell (nothing told for that long) is told at once, anything else with the next
notice. The idle timer and a swap's "in use" checks see a worker's requests in flight
without any of this (``busy``, ``idle``: a replica's count and when it last fell to zero),
so a notice that is a second late does not let a model in use be slept or swapped out; the
first arrival after a quiet spell goes at once because a quiet model is the one a swap
weighs now, by when it was last asked for and by which keys and priorities.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from backends import clock
from backends.on_demand import OnDemandModel
from gateway.workers.channel import Message

TELL_EVERY = 1.0  # seconds between a worker's demand notices, at least
Arrival = tuple[float, str | None, int]  # when (clock.now()), its key, its priority
Served = tuple[float, float, int]  # when it ended (clock.now()), seconds upstream, tokens


class Demand:
    """This worker's counts since its last notice, by model."""

    def __init__(self, tell: Callable[[Message], None]) -> None:
        self._tell = tell
        self._arrived: dict[str, list[Arrival]] = {}
        self._served: dict[str, list[Served]] = {}
        self._told = -math.inf  # clock.now() of the last notice
        self._timer: asyncio.TimerHandle | None = None

    def arrived(self, model: str, key: str | None, priority: int) -> None:
        """A request found ``model`` serving (it asks the control plane nothing)."""
        now = clock.now()
        self._arrived.setdefault(model, []).append((now, key, priority))
        if now - self._told >= TELL_EVERY:
            self.flush()
        else:
            self._tell_at(self._told + TELL_EVERY)

    def served(self, model: str, seconds: float, tokens: int) -> None:
        """A request ``model`` served ended: ``seconds`` upstream, ``tokens`` generated."""
        now = clock.now()
        self._served.setdefault(model, []).append((now, seconds, tokens))
        self._tell_at(now + TELL_EVERY)  # later than the last notice by that much, and batched

    def wanted(self, model: str) -> None:
        """A request for ``model``, not serving, went to a fallback: told at once, since the
        control plane starts the model on it (``OnDemandModel.want``)."""
        self._tell({"t": "want", "model": model})

    def flush(self) -> None:
        """Tell what was counted, now (and at the worker's stop)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._arrived and not self._served:
            return
        now = clock.now()
        models = {
            name: {
                "arrived": [[_age(now, at), k, p] for at, k, p in self._arrived.get(name, ())],
                "served": [
                    [_age(now, ended), round(seconds, 4), tokens]
                    for ended, seconds, tokens in self._served.get(name, ())
                ],
            }
            for name in self._arrived.keys() | self._served.keys()
        }
        self._arrived, self._served = {}, {}
        self._told = now
        self._tell({"t": "demand", "models": models})

    def _tell_at(self, when: float) -> None:
        """A notice at ``when``, unless one is due sooner."""
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_at(when, self.flush)


def _age(now: float, at: float) -> float:
    return round(max(0.0, now - at), 4)


def note(model: OnDemandModel, told: Message) -> None:
    """One model's part of a worker's ``demand`` notice, counted in the control plane as its
    own requests (ages back to times on this process's clock)."""
    now = clock.now()
    model.noted(
        [(now - age, key, priority) for age, key, priority in told["arrived"]],
        [(now - age, seconds, tokens) for age, seconds, tokens in told["served"]],
    )
