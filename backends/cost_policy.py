"""The cost policy: which model leaves a GPU for another, and when, by what swaps cost.

``CostPolicy`` (`swaps.policy: cost`) weighs what it knows (``backends.swap_costs``, and the
waiting requests through ``backends.demand``):

- **Turns** go by priority (the model's `on_demand.priority`, its waiters'), then by the
  earliest deadline, then by arrival; a swap that only a thrashing key wants goes last.
- **Victims**: never a `pinned` model, nor one whose `on_demand.priority` outranks the
  newcomer while it is in use (busy, or used within its `min_resident`); a busy one within its
  `min_resident` only for a newcomer of higher rank (a resident's rank: its `priority`, or its
  recent requests'). Of the sets of the rest that make room, the one whose return costs
  least: each victim's recent demand (requests per second) times its wake or start time (for
  an asleep model, stopped: a cold start instead of a wake), then the one that drains fewest
  busy models. Demand before the moment's idleness: a hot model between two requests stays,
  a rarely used one with a request in flight drains. When waiting a moment for a model in its
  `min_resident` costs less than half as much, the swap waits for it (within the batch window
  and the deadlines).
- **Batching**: a victim of no lower rank in session (used within ``QUIET_SHARE`` of the
  batch window, `swaps.batch_window`, per GPU group; `auto`, the default, follows the swap's
  time and the demand on both sides, ``swaps.BatchWindows``) keeps serving, so that its
  session is served without a swap back, until it has been quiet that long or the newcomer's first
  waiter has waited the window, but never so long that a waiter's deadline would pass: the
  swap starts by the earliest deadline less the swap's estimated time. A swap that nobody
  waits for any more is dropped.
- **No thrash by one caller**: while others wait for room on the same GPUs, a key that waits
  for one model there alternates, and its use of the models in the way holds no swap back (a
  caller alone may batch its own work). Each swap is booked to the keys of the requests it
  was made for; a key that caused more than ``THRASH_SWAPS`` in about the last ``THRASH_TAU``
  seconds is thrashing. A swap that only thrashing keys wait for plans after every other
  one, and leaves the models in its way resident for their `min_resident` first, idle or
  not; models brought in for thrashers alone hold no one else back. One key alternating
  between two models gets one swap per `min_resident`, and everyone else's swaps go first.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from backends.lifecycle import BackendState
from backends.swap_policy import (
    UNKNOWN_RETURN,
    Plan,
    choose,
    fits_after,
    in_the_way,
    over,
    return_cost,
    unload_cost,
)

if TYPE_CHECKING:
    from backends.on_demand import OnDemandModel
    from backends.swaps import Switchboard

S = BackendState
THRASH_SWAPS = 3.0
THRASH_TAU = 300.0
QUIET_SHARE = 0.5  # of the batch window: a resident used within it is in session
DEADLINE_MARGIN = 1.0  # seconds a swap starts before a deadline's bound, for the estimate's error


class CostPolicy:
    """Priority, deadlines, the cost of a return, batching and the thrash guard."""

    name = "cost"

    def rank(self, model: OnDemandModel, board: Switchboard, now: float) -> tuple[float, ...]:
        waiters = board.waiters(model)
        deadlines = [w.deadline for w in waiters if w.deadline is not None]
        return (
            1.0 if board.thrashing(model, now) else 0.0,
            -float(priority(model, board)),
            min(deadlines, default=math.inf),
            board.asked_at(model),
        )

    def plan(
        self, model: OnDemandModel, board: Switchboard, now: float, *, estimating: bool = False
    ) -> Plan:
        held, found = in_the_way(model, board)
        if not found and not over(model, held):
            return Plan([], why="fits")
        rank, thrashing = priority(model, board), board.thrashing(model, now)
        eligible, blocked = [], []
        protected: dict[OnDemandModel, float] = {}  # busy for less than `min_resident`: until
        for m in found:
            if m.config.pinned:
                continue
            if m.state is S.READY and m.config.priority > rank and _in_use_recently(m, now):
                blocked.append(math.inf if m.busy else m.last_used + m.config.min_resident)
                continue
            if (
                m.state is S.READY
                and m.busy
                and (thrashing or not m.thrash_loaded)  # a thrasher's model yields to others
                and serving_rank(m, now) >= rank
                and m.resident_for < m.config.min_resident
            ):
                protected[m] = now + m.config.min_resident - m.resident_for
                continue
            eligible.append(m)
        protected.update(_coming(model, board, now))
        victims = cheapest(model, held, eligible, board, now)
        plan = self._cheaper_soon(model, held, victims, eligible, protected, board, now)
        if plan is None:
            if victims is None:
                waits = [*blocked, *protected.values()]
                return Plan(None, wait_until=min(waits, default=math.inf), why="nothing can go")
            hold, why = self._hold(model, victims, board, now)
            plan = Plan(victims, wait_until=hold, why=why or "cheapest return")
        if plan.wait_until > now and not board.waiters(model) and not estimating:
            return Plan(None, abandon=True, why="nobody waits")  # a swap that would wait
        return plan

    def _cheaper_soon(
        self,
        model: OnDemandModel,
        held: dict[int, float],
        victims: list[OnDemandModel] | None,
        eligible: list[OnDemandModel],
        protected: dict[OnDemandModel, float],
        board: Switchboard,
        now: float,
    ) -> Plan | None:
        """A plan to wait for models still in their `min_resident` (or still coming up) when
        unloading them then costs less than half of what unloading the others now would (a
        hot model kept, for a few seconds' wait), if their GPUs are free within the batch
        window of when the others' would be, and within the waiters' deadlines."""
        if not protected:
            return None
        later = cheapest(model, held, [*eligible, *protected], board, now)
        if later is None or not any(m in protected for m in later):
            return None
        if victims is not None:
            cost_now = sum(undo_cost(m, board, now) for m in victims)
            if sum(undo_cost(m, board, now) for m in later) >= cost_now / 2:
                return None
        ready_at = max(protected.get(m, now) for m in later)
        if victims is not None:  # no later than the window past when the others would be out
            free_now = max(unload_cost(m, board) for m in victims)
            free_later = max(unload_cost(m, board) for m in later) + ready_at - now
            late = ready_at > deadline_bound(model, later, board, now)
            if late or free_later > free_now + board.batch_window(model, victims):
                return None
        return Plan(later, wait_until=ready_at, why="cheaper in a moment")

    def _hold(
        self, model: OnDemandModel, victims: list[OnDemandModel], board: Switchboard, now: float
    ) -> tuple[float, str]:
        """Until when the victims keep serving (batching, the thrash guard); ``now`` if not."""
        window = board.batch_window(model, victims)
        rank, thrashing = priority(model, board), board.thrashing(model, now)
        waiters = board.waiters(model)
        skip = alternating(model, board)
        quiet = window * QUIET_SHARE
        in_session = {  # used within `quiet` by keys that do not alternate: until
            v: used + quiet
            for v in victims
            if v.state is S.READY
            and serving_rank(v, now, window) >= rank
            and (thrashing or not v.thrash_loaded)
            and (used := last_session_use(v, skip)) > now - quiet
        }
        end, why = now, ""
        if in_session and window > 0:
            first = min((w.since for w in waiters), default=now)
            end = min(first + window, deadline_bound(model, victims, board, now))
            end, why = min(end, max(in_session.values())), "batching"
        if thrashing:  # each victim resident, and others' quiet, for their `min_resident`
            guard = max((_guarded_until(v) for v in victims), default=now)
            if guard > end:
                end, why = guard, "thrash guard"
        return end, why


MAX_VICTIMS = 3  # sets of up to this many are weighed against each other; larger, greedily


def cheapest(
    model: OnDemandModel,
    held: dict[int, float],
    candidates: Sequence[OnDemandModel],
    board: Switchboard,
    now: float,
) -> list[OnDemandModel] | None:
    """Of the sets of candidates whose unloading makes ``model`` fit, the one that drains
    fewest busy models, then costs least to undo (each victim's recent demand times the
    seconds its return would take), then has fewest members."""
    best: tuple[tuple[float, float, int], list[OnDemandModel]] | None = None
    for size in range(1, min(MAX_VICTIMS, len(candidates)) + 1):
        for group in itertools.combinations(candidates, size):
            if not fits_after(model, held, group):
                continue
            score = (
                sum(undo_cost(m, board, now) for m in group),
                float(sum(m.busy for m in group)),
                size,
            )
            if best is None or score < best[0]:
                best = (score, list(group))
    if best is not None:
        return best[1]
    ordered = sorted(candidates, key=lambda m: (undo_cost(m, board, now), m.busy, m.last_used))
    return choose(model, held, ordered)


def undo_cost(model: OnDemandModel, board: Switchboard, now: float) -> float:
    """Expected seconds of swapping per second its unloading costs: its demand times what its
    return takes (for an asleep model, stopped: a cold start instead of a wake)."""
    rate = model.arrivals.rate(now) + 1e-9  # a model nobody asks for costs (almost) nothing
    if model.state is S.ASLEEP:
        wake = model.costs.wake(model.slept_level or 2) or 0.0
        return rate * max(0.0, (model.costs.cost("start") or UNKNOWN_RETURN) - wake)
    return rate * return_cost(model, board)


def priority(model: OnDemandModel, board: Switchboard) -> int:
    """A model's rank for a swap: its own `priority`, or its most urgent waiter's."""
    waiting = [w.priority for w in board.waiters(model)]
    return max([model.config.priority, *waiting])


def serving_rank(model: OnDemandModel, now: float, within: float | None = None) -> int:
    """A resident model's rank against a newcomer: its own `priority`, or that of the
    requests it was asked lately (within ``within`` seconds, default its `min_resident`)."""
    since = now - (model.config.min_resident if within is None else within)
    recent = [p for p, at in model.asked_with.items() if at >= since]
    return max([model.config.priority, *recent])


def deadline_bound(
    model: OnDemandModel, victims: list[OnDemandModel], board: Switchboard, now: float
) -> float:
    """The latest the swap may begin so that every waiter with a deadline is served by it."""
    deadlines = [w.deadline for w in board.waiters(model) if w.deadline is not None]
    if not deadlines:
        return math.inf
    swap = max((unload_cost(v, board) for v in victims), default=0.0)
    return min(deadlines) - swap - (model.bring_up_cost() or 0.0) - DEADLINE_MARGIN


def alternating(model: OnDemandModel, board: Switchboard) -> set[str | None]:
    """The keys whose use of the models in ``model``'s way holds no swap back: while another
    key waits for room on its GPUs too, every key that waits there (for ``model`` or another
    model), as each is using one model while it waits for another; else none."""
    gpus = set(model.usage)
    mine = {w.key for w in board.waiters(model)}
    rivals = [m for m in board.asking_for_room() if m is not model and gpus & set(m.usage)]
    waiting = mine | {w.key for m in rivals for w in board.waiters(m)}
    return waiting if waiting - mine else set()


def last_session_use(model: OnDemandModel, alternating: set[str | None]) -> float:
    """When the model in the way was last used for a session that holds a swap back: its
    last use (a request's arrival or end), unless alternating keys asked for it last; then
    the last request of any other key."""
    others, theirs = -math.inf, -math.inf
    for key, at in model.asked_by.items():
        if key in alternating:
            theirs = max(theirs, at)
        else:
            others = max(others, at)
    return model.last_used if others >= theirs else others


def _coming(model: OnDemandModel, board: Switchboard, now: float) -> dict[OnDemandModel, float]:
    """Models starting or waking on ``model``'s GPUs, and when they may go at the earliest:
    their bring-up, then their `min_resident` (they come up for waiting requests: busy)."""
    gpus = set(model.usage)
    found = {}
    for m in board.models.values():
        if m is model or m.config.pinned or m.state not in (S.STARTING, S.WAKING):
            continue
        if gpus & set(m.usage):
            left = max(0.0, (m.bring_up_cost() or 0.0) - (now - m.state_since))
            found[m] = now + left + m.config.min_resident
    return found


def _guarded_until(victim: OnDemandModel) -> float:
    """How long a thrashing key's swap leaves a victim be: its `min_resident` since it came
    in (a thrasher's own model) or since its last use (anyone else's)."""
    if victim.state is not S.READY or victim.resident_since is None:
        return -math.inf
    since = victim.resident_since
    if not victim.thrash_loaded:
        since = max(since, victim.last_used)
    return since + victim.config.min_resident


def _in_use_recently(model: OnDemandModel, now: float) -> bool:
    return model.busy or now - model.last_used < model.config.min_resident
