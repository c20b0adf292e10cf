"""A backend's refusal of a waiting request, across the channel: the control plane's queue
or on-demand start said no, and the worker raises the same error, of the same class (a full
queue is a 429 `queue_full`, a request's passed deadline a 503 `max_wait_exceeded`, ...), as
one process would (``gateway.backend_errors``)."""

from __future__ import annotations

from backends.errors import (
    DeadlineUnmet,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartFailed,
    Unavailable,
)
from gateway.workers.channel import Message

_KINDS: dict[str, type[Unavailable]] = {
    kind.__name__: kind
    for kind in (Unavailable, QueueFull, QueueTimeout, StartFailed, DeadlineUnmet, ShuttingDown)
}


def refusal(exc: Unavailable) -> Message:
    """What the worker is told (a kind this module does not know goes as ``Unavailable``)."""
    kind = type(exc).__name__
    return {
        "kind": kind if kind in _KINDS else "Unavailable",
        "message": str(exc),
        "retry_after": exc.retry_after,
        "estimate": exc.estimate,
        "passed": getattr(exc, "passed", False),
    }


def refused(doc: Message) -> Unavailable:
    """The error a worker raises for ``doc``."""
    kind = _KINDS.get(doc.get("kind", "Unavailable"), Unavailable)
    message, retry_after, estimate = doc["message"], doc["retry_after"], doc.get("estimate")
    if kind is DeadlineUnmet:
        return DeadlineUnmet(message, retry_after, estimate, bool(doc.get("passed")))
    return kind(message, retry_after, estimate)
