"""The on-demand policy's interfaces: its settings (`models[].on_demand`), what a request
waits on before it is relayed, and what the supervisor does for it (``backends.on_demand``
holds the policy itself)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from backends.life import ModelLife
    from backends.lifecycle import BackendState

RETRY_AFTER_FULL = 5.0  # seconds a client is told to wait when its deadline cannot be told


@dataclass(frozen=True)
class OnDemand:
    """`models[].on_demand`, in seconds (and requests)."""

    idle_ttl: float = 300.0
    start_timeout: float = 900.0
    min_resident: float = 30.0
    drain_timeout: float = 120.0
    unload: Literal["stop", "sleep"] = "stop"
    # 1 wakes fastest; 2 falls asleep fastest; auto: 1 when the host has the memory, per sleep
    sleep_level: Literal[1, 2, "auto"] = 1
    retry_after_full: float = RETRY_AFTER_FULL  # Retry-After when max_waiting wait already
    priority: int = 0  # a model that outranks others keeps its GPUs while they wait
    pinned: bool = False  # loaded with the gateway, never swapped out (it may still sleep)
    costs: Mapping[str, float] = field(default_factory=dict)  # first estimates, by phase


class Startable(Protocol):
    """What a request waits on before it is relayed (``ReplicaPool.on_demand``): the model
    itself here, or, in a worker process of the gateway, its stand-in that asks the control
    plane to start it (``gateway.workers.mirror``)."""

    name: str

    @property
    def state(self) -> BackendState: ...

    @property
    def serving(self) -> bool: ...

    async def ready(
        self, deadline: float | None = None, *, key: str | None = None, priority: int = 0
    ) -> float:
        """Return once the model serves, starting it if needed, within ``deadline`` (on
        ``backends.clock``); the seconds this waited."""
        ...

    def want(self) -> None:
        """Start it for later requests (none waits on it now)."""

    def served(self, seconds: float, tokens: int) -> None:
        """A request it served: its service rate, for the swap scheduler."""


class Servers(Protocol):
    """What the supervisor does for an on-demand model."""

    def life(self, name: str) -> ModelLife:
        """The one writer of the model's states (and its list of replicas)."""

    async def load(self, name: str) -> None:
        """Start the model's servers; return once one is ready, else raise LoadFailed."""

    async def drain(self, name: str) -> None:
        """Take the model's ready servers out of the choice; their requests go on."""

    async def unload(self, name: str) -> None:
        """End the model's servers, whatever they are doing, and free their GPUs."""

    async def sleep(self, name: str, level: int) -> int:
        """Put the model's drained servers to sleep; how many sleep now. SleepModeError if
        one does not."""

    async def wake(self, name: str, level: int) -> None:
        """Wake the model's sleeping servers (and start any that died meanwhile); return
        once one serves. SleepModeError if one does not wake."""
