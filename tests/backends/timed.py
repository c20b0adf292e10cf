"""On-demand models on fake servers (``backends.virtual_servers``) whose calls take the
virtual seconds a test gives them.

The scheduler's tests run on ``backends.clock.VirtualTimeLoop`` (``virtual``): a start of 60 s
takes 60 virtual seconds and no real ones, and a test can say exactly when things happen.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from backends import clock
from backends.cost_policy import CostPolicy
from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel
from backends.on_demand_api import OnDemand
from backends.pool import ReplicaPool
from backends.swap_policy import SwapPolicy
from backends.swaps import BatchWindows, Switchboard, Window
from backends.virtual_servers import VirtualServers

S = BackendState
GIB = 2**30
H200 = {  # the seconds each call takes (load/results/gpu-2026-11-30.md)
    "start": 60.0,
    "wake_1": 0.8,
    "wake_2": 2.4,
    "sleep_1_first": 16.0,
    "sleep_1": 0.35,
    "sleep_2": 0.1,
    "stop": 2.0,
}
T = TypeVar("T")


def virtual(test: Callable[[], Awaitable[T]]) -> Callable[[], T]:
    """Run an async test on a virtual-time loop of its own (starting at 1000 s)."""

    @functools.wraps(test)
    def run() -> T:
        return clock.run_virtual(test(), start=1000.0)  # type: ignore[arg-type]

    return run


class TimedServers(VirtualServers):
    """Each call takes its phase's seconds (``H200``, or the test's), the same every time."""

    def __init__(self, seconds: Mapping[str, float] | None = None, host_free: float = math.inf):
        table = {**H200, **(seconds or {})}
        super().__init__(lambda phase, _model: table[phase], host_free)


def board_of(
    servers: TimedServers,
    configs: Mapping[str, OnDemand],
    policy: SwapPolicy | None = None,
    window: Window = 30.0,
) -> tuple[Switchboard, dict[str, OnDemandModel]]:
    """The models (added to ``servers`` first), on a switchboard with the cost policy."""
    models = {
        name: OnDemandModel(
            name, config, servers, asleep_share=0.01, weight_bytes=servers.weights[name] or None
        )
        for name, config in configs.items()
    }
    board = Switchboard(
        models.values(),
        policy=policy or CostPolicy(),
        windows=BatchWindows(window),
        host_free=lambda: servers.host_free,
    )
    return board, models


async def served(
    model: OnDemandModel,
    seconds: float = 1.0,
    *,
    deadline: float | None = None,
    key: str | None = None,
    priority: int = 0,
) -> float:
    """One request as the relay makes it: wait for the model, hold a lease ``seconds``,
    give it back; the seconds it waited."""
    waited = await model.ready(deadline, key=key, priority=priority)
    replica = model.replicas[0]
    with replica.lease(ReplicaPool(model.name, list(model.replicas))):
        await asyncio.sleep(seconds)
    model.served(seconds, 100)
    return waited


def asleep_config(**fields: Any) -> OnDemand:
    """`unload: sleep` at level 2 unless told, no idle unload within a test."""
    defaults: dict[str, Any] = {"unload": "sleep", "sleep_level": 2, "idle_ttl": 3600.0}
    return OnDemand(**{**defaults, **fields})
