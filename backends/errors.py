"""The one root of every error the backends package raises on purpose.

The gateway maps these to its HTTP errors in one module; anything else raised below is a bug
and reaches the gateway's outer error boundary as such.

    BackendError
    ├── Unavailable          a waiting request cannot be served now (has ``retry_after``)
    │   ├── QueueFull        the model's queue refuses it: `max_waiting` wait already
    │   │   └── QueueTimeout     it waited `max_wait` seconds for its turn
    │   ├── StartFailed      the model could not be started
    │   ├── DeadlineUnmet    it would wait, or has waited, longer than its client allows
    │   └── ShuttingDown     the gateway stops
    ├── LoadFailed           no server of a model became ready (says why)
    ├── SpawnError           a server cannot be spawned safely (its socket directory)
    ├── SleepModeError       a sleep or wake call failed, or the server says otherwise
    └── AdapterError         a server refused or failed a LoRA adapter load or unload
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backends.pool import Replica


class BackendError(Exception):
    pass


class Unavailable(BackendError):
    """A waiting request cannot be served now; it is answered 503 with ``retry_after``.
    ``estimate``: the seconds the model was estimated to be away then (None: unknown)."""

    def __init__(self, message: str, retry_after: float, estimate: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.estimate = estimate


class QueueFull(Unavailable):
    """The model's queue (``backends.queue``) refuses the request: it is overloaded."""


class QueueTimeout(QueueFull):
    """The request waited its model's `max_wait` and did not get its turn."""


class StartFailed(Unavailable):
    pass


class DeadlineUnmet(Unavailable):
    """The estimated wait exceeds the request's deadline (refused at once), or the deadline
    passed while it waited (``passed``): refused, never served late."""

    def __init__(
        self, message: str, retry_after: float, estimate: float | None, passed: bool
    ) -> None:
        super().__init__(message, retry_after, estimate)
        self.passed = passed


class ShuttingDown(Unavailable):
    pass


class LoadFailed(BackendError):
    """Raised by ``Servers.load`` when no server of the model became ready; says why."""


class SpawnError(BackendError):
    """A server cannot be spawned safely: a start that fails at once, counted as such."""


class SleepModeError(BackendError):
    """A sleep or wake call failed, or the server does not say what it was asked to be."""


class AdapterError(BackendError):
    """A server refused or failed a load or unload; ``status`` is its HTTP status (0: none)."""

    def __init__(self, replica: Replica, status: int, message: str) -> None:
        super().__init__(f"{replica.url}: {status or 'no answer'}: {message}")
        self.replica = replica
        self.status = status
        self.message = message
