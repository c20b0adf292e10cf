"""Which on-demand model leaves a GPU for another, and when: the switchboard's two policies.

The switchboard (``backends.swaps``) applies a plan; a policy makes it. It answers two
questions, on the board's clock (``backends.clock``):

- ``rank``: of the models waiting for room on the same GPUs, which plans first;
- ``plan``: for that model, which models to unload (and whether to wait first).

``LruPolicy`` is the gateway's first policy, kept to compare against (`swaps.policy: lru`): in
the order of asking; idle models first, least recently used first, then busy ones resident
for their `min_resident`, then asleep ones; no waiting but for `min_resident`.

``CostPolicy`` (`swaps.policy: cost`, ``backends.cost_policy``) weighs what it knows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from backends.lifecycle import BackendState
from backends.placement import MAX_SHARE_PER_GPU

if TYPE_CHECKING:
    from backends.on_demand import OnDemandModel
    from backends.swaps import Switchboard

S = BackendState
SLACK = 1e-9
UNKNOWN_RETURN = 60.0  # seconds assumed for a return nobody has measured or configured


@dataclass(frozen=True, slots=True)
class Plan:
    """``victims``: the models to unload (``[]``: it fits now), or None: no set of models can
    go now. ``wait_until``: plan again by then (a batching hold, a `min_resident`), or on any
    change first; with victims, they go once it has passed. ``abandon``: nobody waits."""

    victims: list[OnDemandModel] | None
    wait_until: float = -math.inf
    abandon: bool = False
    why: str = ""


class SwapPolicy(Protocol):
    name: str

    def rank(self, model: OnDemandModel, board: Switchboard, now: float) -> tuple[float, ...]:
        """Lower plans first, among the models waiting for room on the same GPUs."""

    def plan(
        self, model: OnDemandModel, board: Switchboard, now: float, *, estimating: bool = False
    ) -> Plan:
        """``estimating``: for the estimate of a request about to wait (then never
        ``abandon``); its waiter is among ``board.waiters(model)`` meanwhile."""


def limit() -> float:
    return MAX_SHARE_PER_GPU + SLACK


def frees(model: OnDemandModel) -> dict[int, float]:
    """What unloading the model gives back per GPU: all of an asleep model's little; an awake
    model that sleeps keeps its asleep share per running server, one that stops keeps nothing."""
    holds = model.holds()
    if model.state is S.ASLEEP or model.config.unload != "sleep":
        return holds
    kept: dict[int, float] = {}
    for replica in model.replicas:
        if replica.state not in (S.STOPPED, S.FAILED):
            for gpu in replica.gpus:
                kept[gpu] = kept.get(gpu, 0.0) + model.asleep_share
    return {g: share - kept.get(g, 0.0) for g, share in holds.items()}


def in_the_way(
    model: OnDemandModel, board: Switchboard
) -> tuple[dict[int, float], list[OnDemandModel]]:
    """The shares others hold, and the loaded models on the GPUs where ``model`` does not fit
    (but for those waiting for room themselves: an unload waits for a start to end)."""
    held = board.held(without=model)
    over = {g for g, share in model.usage.items() if held.get(g, 0.0) + share > limit()}
    if not over:
        return held, []
    found = [
        m
        for m in board.models.values()
        if m is not model
        and m.state in (S.READY, S.ASLEEP)
        and over & set(m.usage)
        and not board.wants_room(m)
    ]
    return held, found


def choose(
    model: OnDemandModel, held: dict[int, float], candidates: Sequence[OnDemandModel]
) -> list[OnDemandModel] | None:
    """The first of ``candidates``, in order, whose unloading makes ``model`` fit; None if
    all of them do not."""
    held = dict(held)
    chosen: list[OnDemandModel] = []
    for candidate in candidates:
        chosen.append(candidate)
        for gpu, share in frees(candidate).items():
            held[gpu] = held.get(gpu, 0.0) - share
        if all(held.get(g, 0.0) + share <= limit() for g, share in model.usage.items()):
            return chosen
    return None


def fits_after(
    model: OnDemandModel, held: dict[int, float], group: Sequence[OnDemandModel]
) -> bool:
    """Whether ``model`` fits once every model of ``group`` is unloaded."""
    left = dict(held)
    for member in group:
        for gpu, share in frees(member).items():
            left[gpu] = left.get(gpu, 0.0) - share
    return all(left.get(g, 0.0) + share <= limit() for g, share in model.usage.items())


class LruPolicy:
    """The gateway's first policy: arrival order, least recently used first."""

    name = "lru"

    def rank(self, model: OnDemandModel, board: Switchboard, now: float) -> tuple[float, ...]:
        return (board.asked_at(model),)

    def plan(
        self, model: OnDemandModel, board: Switchboard, now: float, *, estimating: bool = False
    ) -> Plan:
        held, found = in_the_way(model, board)
        if not found and not over(model, held):
            return Plan([], why="fits")
        found = [m for m in found if not m.config.pinned]
        asleep = sorted((m for m in found if m.state is S.ASLEEP), key=_lru)
        awake = [m for m in found if m.state is S.READY]
        idle = sorted((m for m in awake if not m.busy), key=_lru)
        resident = [m for m in awake if m.busy and m.resident_for >= m.config.min_resident]
        busy = sorted(resident, key=_lru)
        victims = choose(model, held, [*idle, *busy, *asleep])
        if victims is not None:
            return Plan(victims, why="least recently used")
        return Plan(None, wait_until=_min_resident_ends(awake), why="busy for min_resident")


def return_cost(model: OnDemandModel, board: Switchboard, unknown: float = UNKNOWN_RETURN) -> float:
    """Seconds to bring the model back once it has gone the way a swap would send it
    (``unknown`` if that was never measured nor configured)."""
    if model.config.unload == "sleep" and model.state in (S.READY, S.STARTING, S.WAKING):
        seconds = model.costs.wake(board.sleep_level(model))
    else:
        seconds = model.costs.cost("start")
    return unknown if seconds is None else seconds


def unload_cost(model: OnDemandModel, board: Switchboard) -> float:
    """Seconds until the model, unloaded for a swap, has freed its GPUs: its drain (the last of
    its requests in flight to end: a request's length times the harmonic number of how many,
    as for memoryless lengths), then its sleep or stop."""
    flight = model.in_flight
    drain = (model.costs.service.request_s or 0.0) * sum(1.0 / i for i in range(1, flight + 1))
    return drain + settle_cost(model, board, asleep_later=model.state is S.READY)


def settle_cost(model: OnDemandModel, board: Switchboard, *, asleep_later: bool) -> float:
    """Seconds its sleep (``asleep_later`` and `unload: sleep`) or its stop takes, known
    parts only."""
    costs = model.costs
    if asleep_later and model.config.unload == "sleep":
        level = board.sleep_level(model)
        return costs.sleep(level, first=level == 1 and not model.slept_at_1) or 0.0
    return costs.cost("stop") or 0.0


def swap_time(model: OnDemandModel, victims: Sequence[OnDemandModel], board: Switchboard) -> float:
    """Seconds the swap itself takes, drains aside: the victims' sleep or stop, then the
    model's wake or start. Measured or configured parts only."""
    out = max((settle_cost(v, board, asleep_later=True) for v in victims), default=0.0)
    return out + (model.bring_up_cost() or 0.0)


def over(model: OnDemandModel, held: dict[int, float]) -> bool:
    return any(held.get(g, 0.0) + share > limit() for g, share in model.usage.items())


def _min_resident_ends(awake: Sequence[OnDemandModel]) -> float:
    """When the first busy model in the way reaches its `min_resident` (a plan may change)."""
    ends = [
        m.resident_since + m.config.min_resident
        for m in awake
        if m.busy and m.resident_since is not None and m.resident_for < m.config.min_resident
    ]
    return min(ends, default=math.inf)


def _lru(model: OnDemandModel) -> float:
    return model.last_used
