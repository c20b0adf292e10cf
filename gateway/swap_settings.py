"""`swaps`: how on-demand models take turns on the GPUs they share (``backends.swap_policy``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, PlainValidator, WithJsonSchema, model_validator

from backends.swaps import DEFAULT_BATCH_WINDOW
from gateway.strict import FieldProblems, Strict


def _window(value: object) -> float | Literal["auto"]:
    """Seconds (0 or more), or `auto`: one problem, said once (a union would say two)."""
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError("expected seconds (a number, 0 or more) or auto")
    return float(value)


BatchWindow = Annotated[
    float | Literal["auto"],
    PlainValidator(_window),
    WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, {"const": "auto"}]}),
]


class SwapGroupSettings(Strict):
    """GPUs whose swaps batch for a window of their own."""

    gpus: list[int] = Field(min_length=1, description="the GPU indexes of the group")
    batch_window: BatchWindow = Field(
        description="seconds, or auto, as `swaps.batch_window`, for swaps onto these GPUs"
    )


class SwapSettings(Strict):
    """The swap scheduler. `cost` weighs each model's measured swap costs, its demand, the
    waiting requests' priorities and deadlines; `lru` is the first policy, kept to compare."""

    policy: Literal["cost", "lru"] = Field(
        "cost",
        description="cost: batching, cost-aware choice, priorities, the thrash guard "
        "(docs/operations.md#scheduler); lru: least recently used first, in arrival order",
    )
    batch_window: BatchWindow = Field(
        DEFAULT_BATCH_WINDOW,
        description="cost: the longest another model's first request waits for its GPU while a "
        "resident model in session (used within half of it) keeps serving; never past a "
        "waiting request's deadline; auto: the swap's measured time (sleep or stop, then wake "
        "or start) times how many more requests the models in the way get than the newcomer, "
        "at most 120 s (docs/operations.md#scheduler); seconds; 0: none",
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
