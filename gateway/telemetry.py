"""What happens to a request once it is done: metrics, one log line, the status page's window.

The relay fills one ``RequestRecord`` per request and hands it to ``Telemetry.finish``; that is
the only per-request bookkeeping, and it never sees a body or a key, only the key's name.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from backends.pool import ReplicaPool
from gateway.metrics import GatewayMetrics

access_log = logging.getLogger("vllm_gateway.access")

UNROUTED = "-"  # the model label of a request refused before it named a configured model


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
    error: str | None = None  # why a response that had started did not complete


@dataclass(slots=True)
class _Sample:
    at: float
    duration: float
    completion_tokens: int


class RecentWindow:
    """The last requests of one model, for "recent latency" and "tokens per second"."""

    def __init__(self, span: float = 60.0, size: int = 1024) -> None:
        self.span = span
        self._samples: deque[_Sample] = deque(maxlen=size)

    def add(self, duration: float, completion_tokens: int) -> None:
        self._samples.append(_Sample(time.monotonic(), duration, completion_tokens))

    def summary(self) -> dict[str, float | int | None]:
        since = time.monotonic() - self.span
        recent = [s for s in self._samples if s.at >= since]
        durations = sorted(s.duration for s in recent)
        return {
            "requests": len(recent),
            "p50_ms": _ms(durations[len(durations) // 2]) if durations else None,
            "p99_ms": _ms(durations[min(len(durations) - 1, int(len(durations) * 0.99))])
            if durations
            else None,
            "tokens_per_s": round(sum(s.completion_tokens for s in recent) / self.span, 2),
        }


class Telemetry:
    def __init__(self, pools: Iterable[ReplicaPool]) -> None:
        pools = list(pools)
        self.metrics = GatewayMetrics(pools)
        self.windows = {pool.name: RecentWindow() for pool in pools}

    def finish(self, record: RequestRecord) -> None:
        duration = time.perf_counter() - record.started
        self.metrics.observe(
            record.model,
            record.endpoint,
            record.status,
            record.key,
            duration,
            record.ttfb,
            record.stream,
            record.usage,
        )
        window = self.windows.get(record.model)
        if window is not None:
            window.add(duration, record.usage[1] if record.usage else 0)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %s %d %.1fms",
                record.endpoint,
                record.model,
                record.key,
                record.status,
                duration * 1000,
                extra={"request": _fields(record, duration)},
            )


def _fields(record: RequestRecord, duration: float) -> dict[str, object]:
    """The access log line's structured fields: never a body, never a key."""
    fields: dict[str, object] = {
        "request_id": record.request_id,
        "key": record.key,
        "model": record.model,
        "backend": record.backend,
        "endpoint": record.endpoint,
        "status": record.status,
        "stream": record.stream,
        "latency_ms": _ms(duration),
        "ttfb_ms": _ms(record.ttfb) if record.ttfb is not None else None,
    }
    if record.usage is not None:
        fields["prompt_tokens"], fields["completion_tokens"] = record.usage
    if record.error is not None:
        fields["error"] = record.error
    return fields


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
