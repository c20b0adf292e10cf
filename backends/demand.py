"""Who waits for which on-demand model: what the swap scheduler reads of the waiting requests.

The scheduler (``backends.swap_policy``) needs, per model, each waiting request's priority,
deadline, the key it came with and since when it waits; it reads them through ``Demand`` and
nothing else, so whichever queue holds the requests can answer. ``ModelsDemand`` answers from
the waiters that ``OnDemandModel.ready()`` keeps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from backends.on_demand import OnDemandModel


@dataclass(frozen=True, slots=True, eq=False)
class Waiter:
    """One request waiting for its model (times on ``backends.clock``)."""

    since: float
    priority: int = 0  # higher goes first
    deadline: float | None = None  # past it, the request is refused, never served late
    key: str | None = None  # the API key's name, for the thrash guard


class Demand(Protocol):
    def waiters(self, model: str) -> Sequence[Waiter]:
        """The requests waiting for ``model`` now, in no particular order."""


class ModelsDemand:
    """The waiters each model's ``ready()`` holds."""

    def __init__(self, models: Mapping[str, OnDemandModel]) -> None:
        self.models = models

    def waiters(self, model: str) -> Sequence[Waiter]:
        found = self.models.get(model)
        return found.waiters if found is not None else ()
