"""`models[].queue`: how many requests a model takes at once, and how many may wait, how long.
``backends.queues`` is the queue itself; ``gateway.traffic.admission`` builds its limits."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from backends.queues import DEFAULT_MAX_WAITING
from gateway.strict import FieldProblems, Strict
from gateway.traffic.priorities import PriorityValue, describe, number


class QueueSettings(Strict):
    """The model's queue in the gateway: beyond `max_in_flight` requests wait, by priority
    (the key's, or the `x-vllm-gateway-priority` header's), then fairly between keys, then
    in order of arrival; beyond `max_waiting` or `max_wait`, 429 with Retry-After."""

    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="requests its servers get at once; beyond, they wait in the gateway, "
        "by priority, then fairly between keys (their `weight`); unset: no cap, nothing "
        "waits but for an on-demand start",
    )
    max_waiting: int = Field(
        DEFAULT_MAX_WAITING,
        ge=1,
        description="requests that may wait at once (an on-demand start's too); beyond, 429 "
        "`queue_full` with Retry-After; formerly `on_demand.max_waiting`",
    )
    max_wait: float | None = Field(
        None,
        gt=0,
        description="seconds a request may wait for its turn, from its arrival (an on-demand "
        "start included); then 429 `queue_timeout` with Retry-After; unset: no limit (a "
        "start still ends at its `start_timeout`)",
    )
    reserved: dict[PriorityValue, Annotated[int, Field(ge=1)]] = Field(
        default_factory=dict,
        description="priority -> slots of `max_in_flight` kept for it and the better "
        "priorities: with `{interactive: 2}` requests of a worse priority leave 2 slots free, "
        "less those interactive requests hold, so up to 2 interactive ones at once find a "
        "slot instead of waiting for a batch one to end (kept slots idle while unused); "
        "unset: none kept",
    )

    @model_validator(mode="after")
    def _reserved_fits(self) -> QueueSettings:
        if self.reserved and self.max_in_flight is None:
            raise FieldProblems([("reserved", "keeps slots of `max_in_flight`: set that too")])
        problems, kept, seen = [], 0, set()
        for value, slots in sorted(self.reserved.items(), key=lambda item: number(item[0])):
            priority = number(value)
            if priority in seen:
                problems.append((f"reserved.{value}", f"names {describe(priority)} again"))
            elif slots <= kept:
                problems.append(
                    (
                        f"reserved.{value}",
                        f"keeps {slots}, no more than the {kept} a better priority keeps, "
                        "which are kept for it too: give a worse priority more",
                    )
                )
            elif self.max_in_flight is not None and slots >= self.max_in_flight:
                problems.append(
                    (
                        f"reserved.{value}",
                        f"keeps {slots} of `max_in_flight` {self.max_in_flight}: worse "
                        "priorities would get none",
                    )
                )
            seen.add(priority)
            kept = max(kept, slots)
        if problems:
            raise FieldProblems(problems)
        return self

    def reservations(self) -> tuple[tuple[int, int], ...]:
        """``QueueLimits.reserved``: (priority, slots), better priorities first."""
        return tuple(sorted((number(value), slots) for value, slots in self.reserved.items()))
