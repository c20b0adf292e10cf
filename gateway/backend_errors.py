"""The one place where the backends' errors (``backends.errors``) become gateway errors.

The backends package knows nothing of HTTP; what it raises on purpose descends from
``BackendError``, and each kind is mapped here to the status a client should see. A
``BackendError`` of a kind not listed is not translated: it reaches the outer error boundary
(``gateway.boundary``) as the bug it is, as httpx's ``map_httpcore_exceptions`` re-raises what
it does not know.

    QueueTimeout                                        -> QueueTimedOut     429 + Retry-After
    QueueFull                                           -> Overloaded        429 + Retry-After
    DeadlineUnmet                                       -> MaxWaitExceeded   503 + Retry-After
    Unavailable (StartFailed, ShuttingDown)             -> ModelNotStarted   503 + Retry-After
    LoadFailed                                          -> ModelNotStarted   503 + Retry-After
    SleepModeError                                      -> BadGateway        502
    AdapterError                                        -> AdapterNotFound   404 (vLLM's 404)
                                                           InvalidRequest    400 (vLLM's 4xx)
                                                           BadGateway        502 (else)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

from backends.errors import (
    AdapterError,
    BackendError,
    DeadlineUnmet,
    LoadFailed,
    QueueFull,
    QueueTimeout,
    SleepModeError,
    Unavailable,
)
from gateway import waits
from gateway.errors import (
    AdapterNotFound,
    BadGateway,
    GatewayError,
    InvalidRequest,
    MaxWaitExceeded,
    ModelNotStarted,
    Overloaded,
    QueueTimedOut,
)


@contextlib.contextmanager
def backend_errors() -> Iterator[None]:
    """Calls into backends/ inside this block raise gateway errors for the kinds known here."""
    try:
        yield
    except BackendError as exc:
        error = from_backend(exc)
        if error is None:
            raise
        raise error from exc


def from_backend(exc: BackendError) -> GatewayError | None:
    """The gateway error for a backend error; None for a kind this module does not know."""
    if isinstance(exc, DeadlineUnmet):
        return MaxWaitExceeded(str(exc), retry_after=max(1, math.ceil(exc.retry_after)))
    if isinstance(exc, Unavailable):
        retry_after = max(1, math.ceil(exc.retry_after))
        if isinstance(exc, QueueTimeout):
            return QueueTimedOut(str(exc), retry_after=retry_after)
        if isinstance(exc, QueueFull):  # a start's queue too: one queue, one answer
            return Overloaded(str(exc), retry_after=retry_after)
        return ModelNotStarted(str(exc), retry_after=retry_after)
    if isinstance(exc, LoadFailed):
        return ModelNotStarted(str(exc), retry_after=waits.RETRY_LOADING)
    if isinstance(exc, SleepModeError):
        return BadGateway(str(exc))
    if isinstance(exc, AdapterError):
        return _refusal(exc) or BadGateway(str(exc))
    return None


def adapter_failure(
    doing: str, name: str, errors: Sequence[AdapterError], alike: bool
) -> GatewayError:
    """A load or unload that failed on some replicas. ``alike``: every replica refused, the
    same way, so vLLM's own answer (a path with no adapter: 404) is the client's."""
    if alike and (refusal := _refusal(errors[0])) is not None:
        return refusal
    each = "; ".join(f"{e.replica.url}: {e.status or 'no answer'} {e.message}" for e in errors)
    return BadGateway(f"{doing} adapter {name!r} failed on {len(errors)} replica(s): {each}")


def _refusal(exc: AdapterError) -> GatewayError | None:
    """vLLM's own 4xx for an adapter call, passed on (``param``: the adapter's path)."""
    if exc.status == 404:
        return AdapterNotFound(exc.message, param="path")
    if 400 <= exc.status < 500:
        return InvalidRequest(exc.message, param="path")
    return None
