"""The GPUs' books for on-demand models: who holds which share, and who must go to make room.

Always-on models hold their shares for ever (``backends.placement`` refuses a layout where
they do not fit). An on-demand model holds its shares from the moment it starts (or begins
to wake) until its servers have ended; asleep, it holds only its CUDA context. Before one
starts or wakes, the switchboard unloads (puts to sleep, or stops) running on-demand models
on the GPUs it needs until the shares on each of those GPUs, its own included, stay within
``MAX_SHARE_PER_GPU``. Which ones go, in which order models waiting for room take their turn,
and whether a swap waits first (batching, the thrash guard) is its policy's choice
(``backends.swap_policy``: `lru` or `cost`); the switchboard applies the plans, one at a time
per GPU: a model waiting for room plans only when no model sharing a GPU with it ranks
before it or is unloading others for itself.

It also keeps what the policy weighs beyond each model's own costs: the swaps each API key
caused, the host memory free for a level-1 sleep, and the estimate of a waiting request's
wait that deadlines are checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from opentelemetry.trace import Tracer

from backends import clock, wait_estimate
from backends.cost_policy import THRASH_SWAPS, THRASH_TAU, CostPolicy
from backends.demand import Demand, ModelsDemand, Waiter
from backends.errors import Unavailable
from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel
from backends.placement import available_host_memory
from backends.signals import Signal
from backends.swap_costs import DecayedRate
from backends.swap_policy import LruPolicy, SwapPolicy, limit, swap_time

log = logging.getLogger("vllm_gateway.swaps")
Window = float | Literal["auto"]
S = BackendState
AUTO: Final = "auto"  # a batch window from each swap's time and demand (``Switchboard._auto``)
AUTO_WINDOW_MAX = 120.0  # seconds `auto` holds a newcomer at most (the replay's: swaps-*.md)
DEFAULT_BATCH_WINDOW: Window = AUTO
HOST_RESERVE_BYTES = 8 * 2**30  # host memory a level-1 sleep must leave free for the rest
POLICIES: dict[str, type[LruPolicy] | type[CostPolicy]] = {"lru": LruPolicy, "cost": CostPolicy}


@dataclass(frozen=True, slots=True)
class BatchWindows:
    """`swaps.batch_window`, and the GPU groups that set their own (the smallest wins where a
    model's GPUs fall in several). A window is seconds, or ``AUTO``: as long as the swap
    itself takes (the ski-rental rule: a hold costs the newcomer's first request at most what
    the swap does; cheap wakes, short holds, cold starts, long ones), stretched by how many
    more requests the models in the way get than the newcomer, so that the model that serves
    most of the traffic keeps the GPU longest."""

    default: Window = DEFAULT_BATCH_WINDOW
    groups: tuple[tuple[frozenset[int], Window], ...] = ()

    def for_gpus(self, gpus: Iterable[int]) -> list[Window]:
        mine = set(gpus)
        found = [window for group, window in self.groups if group & mine]
        return found or [self.default]


class Switchboard:
    def __init__(
        self,
        models: Iterable[OnDemandModel],
        always_on: Mapping[int, float] | None = None,
        *,
        policy: SwapPolicy | None = None,
        windows: BatchWindows | None = None,
        host_free: Callable[[], float | None] = available_host_memory,
        demand: Demand | None = None,
    ) -> None:
        """``always_on``: GPU index -> the shares always-on models hold on it. ``host_free``:
        bytes of host memory free now (for `sleep_level: auto`). ``demand``: who waits for
        which model (default: the models' own waiters)."""
        self.models = {m.name: m for m in models}
        self.always_on = dict(always_on or {})
        self.policy: SwapPolicy = policy or LruPolicy()
        self.windows = windows or BatchWindows()
        self.host_free = host_free
        self.demand: Demand = demand or ModelsDemand(self.models)
        self.closing = False
        self.tracer: Tracer | None = None  # set when the gateway traces: a span per swap
        self.changed = Signal()  # a model asks for room or stops asking, a waiter comes or goes
        self.swaps = 0  # models unloaded to make room for another
        self.key_swaps: dict[str, DecayedRate] = {}
        self._asked: dict[OnDemandModel, float] = {}  # waiting for room, since
        self._unloading_for: set[OnDemandModel] = set()  # those unloading others now
        self._pins: dict[OnDemandModel, asyncio.Task[None]] = {}
        self._asking: tuple[OnDemandModel, Waiter] | None = None  # while estimating for it
        for model in self.models.values():
            model.board = self

    def use(self, policy: SwapPolicy, windows: BatchWindows) -> None:
        """A reload's policy and windows, for the next plans."""
        self.policy, self.windows = policy, windows
        self.changed.fire()

    async def make_room(self, model: OnDemandModel, then: BackendState) -> bool:
        """Wait for the model's backoff, its turn and room on its GPUs; then move it to
        ``then`` (starting, or waking), which holds its shares from that moment. False if the
        policy dropped the swap (nobody waits for it any more): nothing moved."""
        if (delay := model.not_before - clock.now()) > 0:
            await asyncio.sleep(delay)
        self._asked.setdefault(model, clock.now())
        self.changed.fire()
        try:
            while True:
                now, wait_until = clock.now(), math.inf
                if self._my_turn(model, now):
                    plan = self.policy.plan(model, self, now)
                    if plan.abandon:
                        log.info("%s: swap dropped (%s)", model.name, plan.why)
                        return False
                    if plan.victims is not None and plan.wait_until <= now:
                        if not plan.victims:
                            model.thrash_loaded = self.thrashing(model, now)
                            await model.life.move(then)
                            return True
                        await self._swap(model, plan.victims, plan.why)
                        continue
                    wait_until = plan.wait_until
                await self._something_changes(model, wait_until)
        finally:
            self._asked.pop(model, None)
            self._unloading_for.discard(model)
            self.changed.fire()

    def wants_room(self, model: OnDemandModel) -> bool:
        return model in self._asked

    def asked_at(self, model: OnDemandModel) -> float:
        """When the model began to wait for room (now, if it does not)."""
        return self._asked.get(model, clock.now())

    def _my_turn(self, model: OnDemandModel, now: float) -> bool:
        if model in self._unloading_for:
            return True
        gpus = set(model.usage)
        if any(gpus & set(m.usage) for m in self._unloading_for):
            return False
        rivals = [m for m in self._asked if m is model or gpus & set(m.usage)]
        return min(rivals, key=lambda m: self.policy.rank(m, self, now)) is model

    async def _swap(self, model: OnDemandModel, victims: list[OnDemandModel], why: str) -> None:
        self._unloading_for.add(model)
        self._book(model, victims)
        log.info("%s: unloading %s (%s)", model.name, ", ".join(v.name for v in victims), why)
        reason = f"swapped out for {model.name}"
        unloads = [
            v.unload(reason, stop=v.state is S.ASLEEP, level=self.sleep_level(v)) for v in victims
        ]
        with self._swap_span(model, victims):  # an unload, once begun, ends: even if this
            await asyncio.gather(*(asyncio.shield(u) for u in unloads))  # start is cancelled

    def _book(self, model: OnDemandModel, victims: list[OnDemandModel]) -> None:
        """Count the swap, and book it to the keys of the requests it is made for."""
        self.swaps += len(victims)
        for victim in victims:
            victim.swapped_out += 1
        keys = {w.key for w in self.demand.waiters(model.name) if w.key is not None}
        now = clock.now()
        for key in keys:
            self.key_swaps.setdefault(key, DecayedRate(THRASH_TAU)).tick(now, 1.0 / len(keys))

    def waiters(self, model: OnDemandModel) -> list[Waiter]:
        """Who waits for the model (``demand``), and the request being estimated for it."""
        waiting = list(self.demand.waiters(model.name))
        if self._asking is not None and self._asking[0] is model:
            waiting.append(self._asking[1])
        return waiting

    def thrashing(self, model: OnDemandModel, now: float) -> bool:
        """Whether only keys that caused more than ``THRASH_SWAPS`` swaps lately wait."""
        keys = {w.key for w in self.waiters(model) if w.key is not None}
        return bool(keys) and all(
            key in self.key_swaps and self.key_swaps[key].value(now) > THRASH_SWAPS for key in keys
        )

    def batch_window(self, model: OnDemandModel, victims: Sequence[OnDemandModel]) -> float:
        """Seconds ``victims`` in session may keep serving while ``model`` waits for them."""
        windows = self.windows.for_gpus(model.usage)
        return min(self._auto(model, victims) if w == AUTO else float(w) for w in windows)

    def _auto(self, model: OnDemandModel, victims: Sequence[OnDemandModel]) -> float:
        """`auto`: the swap's time, times how many more requests the victims get than the
        model waiting for them (at least once, at most ``AUTO_WINDOW_MAX``)."""
        now = clock.now()
        theirs = sum(v.arrivals.rate(now) for v in victims)
        share = theirs / (model.arrivals.rate(now) + 1e-9)
        return min(AUTO_WINDOW_MAX, swap_time(model, victims, self) * max(1.0, share))

    def sleep_level(self, model: OnDemandModel) -> int:
        """The level the model sleeps at now: its `sleep_level`, or with `auto`, 1 when the
        host has memory free for its weights (or holds them already, since its first level-1
        sleep), else 2."""
        level = model.config.sleep_level
        if level != "auto":
            return level
        if model.slept_at_1:
            return 1
        free, need = self.host_free(), model.weight_bytes
        if free is None or need is None:
            return 2
        return 1 if need + HOST_RESERVE_BYTES <= free else 2

    def estimate(self, model: OnDemandModel, asking: Waiter | None = None) -> float | None:
        """Seconds a request for ``model`` arriving now (``asking``, default an anonymous one)
        would wait, from what is known: the model's state, what a swap must unload first and
        whether it would wait (the request's own deadline bounds a batching hold), the models
        ahead of it on its GPUs, its start or wake time, and the requests ahead of it at its
        service rate. None when a part of it was never measured nor configured."""
        now = clock.now()
        self._asking = (model, asking or Waiter(now))
        try:
            return wait_estimate.estimate(self, model, self._asking[1], now)
        finally:
            self._asking = None

    def asking_for_room(self) -> list[OnDemandModel]:
        """The models waiting for room now, in no particular order."""
        return list(self._asked)

    async def _something_changes(self, model: OnDemandModel, until: float) -> None:
        """Until a plan may come out otherwise: a model moves or goes idle, a model asks for
        room or stops, a waiter comes or goes, or ``until`` (a hold's end) passes."""
        others = [m for m in self.models.values() if m is not model]
        waits = [m.life.changed.wait() for m in others] + [self.changed.wait()]
        waits += [r.went_idle.wait() for m in others for r in m.replicas if r.in_flight]
        tasks = [asyncio.ensure_future(w) for w in waits]
        timeout = None if math.isinf(until) else max(until - clock.now(), 1e-3)
        try:
            first = asyncio.FIRST_COMPLETED
            await asyncio.wait(tasks, timeout=timeout, return_when=first)
        finally:
            for task in tasks:
                task.cancel()

    @contextlib.contextmanager
    def _swap_span(self, model: OnDemandModel, victims: list[OnDemandModel]) -> Iterator[None]:
        """A span around the unloads that make room (the OpenTelemetry API only: without a
        tracer, nothing). It nests under the current span: the wait of the request, or the
        admin action, that started ``model``."""
        if self.tracer is None:
            yield
            return
        attributes = {
            "vllm_gateway.model": model.name,
            "vllm_gateway.swap.unloaded": [v.name for v in victims],
            "vllm_gateway.swap.states": [str(v.state) for v in victims],
        }
        with self.tracer.start_as_current_span("backends.swap", attributes=attributes):
            yield

    def held(self, without: OnDemandModel | None = None) -> dict[int, float]:
        """GPU -> the shares held on it now: always-on models, and on-demand models from their
        start until their servers have ended, server by server (``OnDemandModel.holds``)."""
        held = dict(self.always_on)
        for m in self.models.values():
            if m is without:
                continue
            for gpu, share in m.holds().items():
                held[gpu] = held.get(gpu, 0.0) + share
        return held

    def swap_groups(self) -> dict[int, list[tuple[str, str]]]:
        """GPU -> pairs of on-demand models that can never run there together."""
        usage = {name: m.usage for name, m in self.models.items()}
        return never_together(usage, self.always_on)

    # Pinned models: loaded with the gateway, never swapped out.

    def start(self) -> None:
        for model in self.models.values():
            self.keep_loaded(model)

    def keep_loaded(self, model: OnDemandModel) -> None:
        """Load a `pinned` model (once: not again while its load goes on)."""
        if not model.config.pinned or self.closing:
            return
        if (task := self._pins.get(model)) is not None and not task.done():
            return
        self._pins[model] = asyncio.create_task(self._pin(model), name=f"pin:{model.name}")

    async def _pin(self, model: OnDemandModel) -> None:
        try:
            await model.ready()
        except Unavailable as exc:
            log.error(
                "%s: pinned, but could not be loaded (its next request tries again): %s",
                model.name,
                exc,
            )

    def add(self, model: OnDemandModel) -> OnDemandModel:
        """A model a reload added."""
        self.models[model.name] = model
        model.board = self
        self.keep_loaded(model)
        return model

    async def remove(self, model: OnDemandModel) -> None:
        """A model a reload removed: no more starts, nor an idle timer."""
        self.models.pop(model.name, None)
        if (task := self._pins.pop(model, None)) is not None:
            task.cancel()
        await model.close()

    async def close(self) -> None:
        self.closing = True
        for task in self._pins.values():
            task.cancel()
        for model in self.models.values():
            await model.close()


def never_together(
    usage: Mapping[str, Mapping[int, float]], always_on: Mapping[int, float]
) -> dict[int, list[tuple[str, str]]]:
    """GPU -> pairs of on-demand models whose shares there, with the always-on ones, exceed
    the limit: they take turns (swap) on that GPU."""
    found: dict[int, list[tuple[str, str]]] = {}
    names = list(usage)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            for gpu in sorted(set(usage[first]) & set(usage[second])):
                total = always_on.get(gpu, 0.0) + usage[first][gpu] + usage[second][gpu]
                if total > limit():
                    found.setdefault(gpu, []).append((first, second))
    return dict(sorted(found.items()))
