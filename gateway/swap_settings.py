"""`swaps`: how on-demand models take turns on the GPUs they share (``backends.swap_policy``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from backends.swaps import DEFAULT_BATCH_WINDOW
from gateway.strict import FieldProblems, Strict


class SwapGroupSettings(Strict):
    """GPUs whose swaps batch for a window of their own."""

    gpus: list[int] = Field(min_length=1, description="the GPU indexes of the group")
    batch_window: float = Field(
        ge=0, description="seconds, as `swaps.batch_window`, for swaps onto these GPUs"
    )


class SwapSettings(Strict):
    """The swap scheduler. `cost` weighs each model's measured swap costs, its demand, the
    waiting requests' priorities and deadlines; `lru` is the first policy, kept to compare."""

    policy: Literal["cost", "lru"] = Field(
        "cost",
        description="cost: batching, cost-aware choice, priorities, the thrash guard "
        "(docs/operations.md#scheduler); lru: least recently used first, in arrival order",
    )
    batch_window: float = Field(
        DEFAULT_BATCH_WINDOW,
        ge=0,
        description="cost: the longest another model's first request waits for its GPU while a "
        "resident model in session (used within half of it) keeps serving; never past a "
        "waiting request's deadline; 0: none",
    )
    groups: list[SwapGroupSettings] = Field(
        default_factory=list, description="cost: GPU groups with a batch window of their own"
    )

    @model_validator(mode="after")
    def _cost_only(self) -> SwapSettings:
        if self.policy == "lru":
            problems: list[tuple[str, str]] = [
                (name, "applies only with `policy: cost`; set that or leave it out")
                for name in ("batch_window", "groups")
                if name in self.model_fields_set
            ]
            if problems:
                raise FieldProblems(problems)
        return self
