"""The config of a model's traffic: its fallbacks (``models[].fallbacks``, ``fallback_on``,
``adapter_fallbacks``) and its own timeouts (``models[].timeouts``). Checks that need the
whole file (names that exist, no cycles) are in ``gateway.traffic.fallback_plan``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.strict import Strict

FallbackReason = Literal["unavailable", "overloaded", "timeout", "context_length"]
REASONS: tuple[FallbackReason, ...] = ("unavailable", "overloaded", "timeout", "context_length")


class ModelTimeouts(Strict):
    """Seconds; a key left out is the top-level `timeouts`' (a reasoning model needs a long
    first byte, an embedder a short one)."""

    connect: float | None = Field(
        None,
        gt=0,
        description="to open a relayed request's connection to this model's replicas (the "
        "gateway's own calls keep `timeouts.connect`)",
    )
    first_byte: float | None = Field(
        None,
        gt=0,
        description="from sending a request to this model's first byte; past it, `timeout` "
        "may fall back",
    )
    idle: float | None = Field(
        None, gt=0, description="longest gap between two chunks of this model's streams"
    )
