"""Replicas of one model and the choice between them.

A replica is one vLLM server. Its ``state`` is written by whoever watches it (the process
supervisor in spawn mode; nobody yet in connect mode, where a server is assumed ready) and read
by the gateway on every request, so it is a plain attribute, not a lock-guarded structure:
everything here runs on one event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class BackendState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(eq=False)
class Replica:
    url: str
    api_key: str | None = None
    state: BackendState = BackendState.READY
    in_flight: int = 0

    @property
    def ready(self) -> bool:
        return self.state is BackendState.READY


@dataclass(eq=False)
class ReplicaPool:
    """The replicas serving one model, under the model's canonical name."""

    name: str
    replicas: list[Replica] = field(default_factory=list)
    max_model_len: int | None = None

    def pick(self) -> Replica | None:
        """The ready replica with the fewest requests in flight, or None if none is ready."""
        best: Replica | None = None
        for replica in self.replicas:
            if replica.ready and (best is None or replica.in_flight < best.in_flight):
                best = replica
        return best

    @property
    def loading(self) -> bool:
        """True while no replica is ready yet but one is on its way (so clients should retry)."""
        return any(
            r.state in (BackendState.LOADING, BackendState.RESTARTING) for r in self.replicas
        )
