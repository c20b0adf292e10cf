"""How long a request for an on-demand model would wait, from what the switchboard knows.

A request with a deadline is refused at once when this runs past it (``OnDemandModel.ready``),
and every refusal of a start or a wake says it. It adds up, in order:

- the models ahead of it on its GPUs (their own bring-up times);
- the room its model needs: the policy's plan for it now (a batching hold, a `min_resident`
  to wait out), then the slowest victim's unload (its drain, its sleep or stop);
- its own bring-up: a wake at the level it sleeps at, else a start; what is left of it when
  one is under way, or after the unload it is in;
- with `queue.max_in_flight`, the requests ahead of it beyond the model's slots, at its
  service rate (without, every waiter goes at once when the model serves).

Each time is a running estimate (``backends.swap_costs``); one never measured nor configured
leaves the estimate unknown (None).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from backends.demand import Waiter
from backends.lifecycle import BackendState
from backends.swap_policy import unload_cost

if TYPE_CHECKING:
    from backends.on_demand import OnDemandModel
    from backends.swaps import Switchboard

S = BackendState


def estimate(board: Switchboard, model: OnDemandModel, asking: Waiter, now: float) -> float | None:
    """``asking``: the request, among the model's waiters (``board.waiters``) meanwhile."""
    state = model.state
    if state is S.READY:
        return 0.0
    up = model.bring_up_cost()
    if up is None:
        return None
    if state in (S.STARTING, S.WAKING):
        wait = max(0.0, up - (now - model.state_since))
    elif state in (S.DRAINING, S.SLEEPING):
        wait = max(0.0, unload_cost(model, board) - (now - model.state_since)) + up
    else:
        room = _room(board, model, now)
        if room is None:
            return None
        wait = room + up
    ahead = _beyond_its_slots(board, model, asking)
    rate = model.costs.service.requests_per_s
    return wait + (ahead / rate if ahead and rate else 0.0)


def _beyond_its_slots(board: Switchboard, model: OnDemandModel, asking: Waiter) -> int:
    """The requests ahead of ``asking`` that still wait for a slot once the model serves:
    with `queue.max_in_flight`, those beyond its slots; without, none (all go at once)."""
    slots = model.queue.limits.max_in_flight
    if slots is None:
        return 0
    ahead = sum(1 for w in board.demand.waiters(model.name) if w.priority >= asking.priority)
    return max(0, ahead + 1 - slots)


def _room(board: Switchboard, model: OnDemandModel, now: float) -> float | None:
    """Seconds until the model's GPUs have room for it."""
    gpus, policy = set(model.usage), board.policy
    mine = policy.rank(model, board, now)
    before = sum(
        other.bring_up_cost() or 0.0
        for other in board.asking_for_room()
        if other is not model and gpus & set(other.usage) and policy.rank(other, board, now) < mine
    )
    plan = policy.plan(model, board, now, estimating=True)
    if plan.victims is None:
        return None if math.isinf(plan.wait_until) else before + plan.wait_until - now
    unload = max((unload_cost(v, board) for v in plan.victims), default=0.0)
    return before + max(0.0, plan.wait_until - now) + unload
