"""What the gateway knows of one request once it is done: a leaf module, so the relay, the
metrics, the access log and the status window all read one shape and none imports another."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

UNROUTED = "-"  # the model label of a request refused before it named a configured model
OTHER_ENDPOINT = "other"  # the endpoint label of a refused request for a path not relayed


@dataclass(frozen=True, slots=True)
class FallbackMove:
    """One fallback: from a model to another, and why (``gateway.traffic``)."""

    model: str
    to: str
    reason: str


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    endpoint: str
    key: str = UNROUTED
    started: float = field(default_factory=time.perf_counter)
    model: str = UNROUTED
    backend: str = UNROUTED
    status: int = 0
    stream: bool = False
    ttfb: float | None = None
    usage: tuple[int, int] | None = None  # prompt, completion tokens
    error: str | None = None  # the gateway's error code, when the gateway answered or cut it
    start_wait: float | None = None  # seconds it waited for its on-demand model to start
    queue_wait: float | None = None  # seconds in its model's queue (a start included), if any
    trace: RequestTrace | None = None  # its spans, when tracing is on (gateway.tracing)
    fallbacks: list[FallbackMove] | None = None  # each move to a fallback model, in order
