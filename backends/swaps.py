"""The GPUs' books for on-demand models: who holds which share, and who must go to make room.

Always-on models hold their shares for ever (``backends.placement`` refuses a layout where
they do not fit). An on-demand model holds its shares from the moment it starts (or begins
to wake) until its servers have ended; asleep, it holds only its CUDA context. Before one
starts or wakes, the switchboard unloads (puts to sleep, or stops) running on-demand
models on the GPUs it needs until the shares on each of those GPUs, its own included, stay
within ``MAX_SHARE_PER_GPU``: idle models first, least recently used first, then busy ones that
have been resident for their `min_resident` seconds (drained first), then asleep ones. One plan
at a time: starts that need room queue here, in the order they asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping

from backends.on_demand import ModelState, OnDemandModel
from backends.placement import MAX_SHARE_PER_GPU

REPLAN_EVERY = 0.5  # seconds, while the models in the way are busy and too new to unload
_SLACK = 1e-9


class Switchboard:
    def __init__(
        self, models: Iterable[OnDemandModel], always_on: Mapping[int, float] | None = None
    ) -> None:
        """``always_on``: GPU index -> the shares always-on models hold on it."""
        self.models = {m.name: m for m in models}
        self.always_on = dict(always_on or {})
        self.closing = False
        self._lock = asyncio.Lock()
        for model in self.models.values():
            model.board = self

    async def make_room(self, model: OnDemandModel, then: ModelState) -> None:
        """Wait for the model's backoff and for room on its GPUs; then move it to ``then``
        (starting, or waking), which holds its shares from that moment."""
        if (delay := model.not_before - time.monotonic()) > 0:
            await asyncio.sleep(delay)
        async with self._lock:
            while True:
                victims = self.victims(model)
                if victims is None:
                    await asyncio.sleep(REPLAN_EVERY)
                    continue
                if not victims:
                    model._move(then)
                    return
                reason = f"swapped out for {model.name}"
                await asyncio.gather(
                    *(v.unload(reason, stop=v.state is ModelState.ASLEEP) for v in victims)
                )

    def victims(self, model: OnDemandModel) -> list[OnDemandModel] | None:
        """The models to unload so that ``model`` fits: [] if it fits now, None if it cannot
        until something changes (a drain ends, a busy model has been resident long enough)."""
        held = self.held(without=model)
        over = {g for g, share in model.usage.items() if held.get(g, 0.0) + share > _limit()}
        if not over:
            return []
        in_the_way = [
            m
            for m in self.models.values()
            if m is not model
            and m.state in (ModelState.READY, ModelState.ASLEEP)
            and over & set(m.usage)
        ]
        # Idle models first, then busy ones resident long enough, each by least recent use; an
        # asleep model last: it holds only its CUDA context, so stopping it rarely helps.
        asleep = sorted((m for m in in_the_way if m.state is ModelState.ASLEEP), key=_lru)
        awake = [m for m in in_the_way if m.state is ModelState.READY]
        idle = sorted((m for m in awake if not m.busy), key=_lru)
        busy = sorted(
            (m for m in awake if m.busy and m.resident_for >= m.config.min_resident), key=_lru
        )
        chosen: list[OnDemandModel] = []
        for candidate in [*idle, *busy, *asleep]:
            chosen.append(candidate)
            for gpu, share in _frees(candidate).items():
                held[gpu] = held.get(gpu, 0.0) - share
            if all(held.get(g, 0.0) + share <= _limit() for g, share in model.usage.items()):
                return chosen
        return None

    def held(self, without: OnDemandModel | None = None) -> dict[int, float]:
        """GPU -> the shares held on it now: always-on models, and on-demand models from their
        start until their servers have ended."""
        held = dict(self.always_on)
        for m in self.models.values():
            if m is without or m.state is ModelState.STOPPED:
                continue
            usage = m.asleep_usage if m.state is ModelState.ASLEEP else m.usage
            for gpu, share in usage.items():
                held[gpu] = held.get(gpu, 0.0) + share
        return held

    def swap_groups(self) -> dict[int, list[tuple[str, str]]]:
        """GPU -> pairs of on-demand models that can never run there together."""
        usage = {name: m.usage for name, m in self.models.items()}
        return never_together(usage, self.always_on)

    async def close(self) -> None:
        self.closing = True
        for model in self.models.values():
            await model.close()


def _lru(model: OnDemandModel) -> float:
    return model.last_used


def _frees(model: OnDemandModel) -> dict[int, float]:
    """What unloading the model gives back per GPU: all of an asleep model's little; an awake
    model that sleeps keeps its asleep share, one that stops keeps nothing."""
    if model.state is ModelState.ASLEEP:
        return model.asleep_usage
    if model.config.unload == "sleep":
        return {g: s - model.asleep_usage.get(g, 0.0) for g, s in model.usage.items()}
    return model.usage


def _limit() -> float:
    return MAX_SHARE_PER_GPU + _SLACK


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
                if total > _limit():
                    found.setdefault(gpu, []).append((first, second))
    return dict(sorted(found.items()))
