"""What happens to a request once it is done: metrics, one log line, the status page's window.

The relay fills one ``RequestRecord`` per request and hands it to ``Telemetry.finish``; that is
the only per-request bookkeeping, and it never sees a body or a key, only the key's name.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from backends.pool import ReplicaPool
from gateway.access_log import AccessLog
from gateway.metrics import GatewayMetrics
from gateway.record import OTHER_ENDPOINT, RequestRecord
from gateway.routing import RELAYED_PATHS

if TYPE_CHECKING:
    from gateway.tracing import Tracing


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

    def add_at(self, at: float, duration: float, completion_tokens: int) -> None:
        """A request another process saw end ``at`` (time.monotonic(): one clock for all)."""
        self._samples.append(_Sample(at, duration, completion_tokens))

    def recent(self, now: float) -> list[tuple[float, float, int]]:
        """The samples within the span, as (at, duration, completion tokens)."""
        since = now - self.span
        return [(s.at, s.duration, s.completion_tokens) for s in self._samples if s.at >= since]

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
    def __init__(
        self,
        pools: list[ReplicaPool],
        access_log: AccessLog | None = None,
        tracing: Tracing | None = None,
        requests_by_key: bool = False,
    ) -> None:
        """``pools``: the gateway's list, read at each scrape (a reload changes it in place);
        ``tracing``: the gateway's tracer, when the config has `tracing`;
        ``requests_by_key``: `metrics.requests_by_key`."""
        self.pools = pools
        self.metrics = GatewayMetrics(pools, requests_by_key)
        self.windows = {pool.name: RecentWindow() for pool in pools}
        self.access_log = access_log
        self.tracing = tracing
        # In a control plane with workers: fetches their shares into these metrics and windows
        # (``gateway.workers.shares``); awaited before each scrape and status document.
        self.gather: Callable[[], Awaitable[None]] | None = None
        if tracing is not None:
            self.metrics.count_spans(tracing.counts)

    async def gathered(self) -> None:
        """Before /metrics or /status.json is answered: every worker's counts, where there are
        workers (nothing to do otherwise)."""
        if self.gather is not None:
            await self.gather()

    def models_changed(self) -> None:
        """A reload added or removed models: a window for each model there is now."""
        self.windows = {p.name: self.windows.get(p.name) or RecentWindow() for p in self.pools}

    def finish(self, record: RequestRecord) -> None:
        duration = time.perf_counter() - record.started
        self.metrics.observe(record, duration)
        window = self.windows.get(record.model)
        if window is not None:
            window.add(duration, record.usage[1] if record.usage else 0)
        if self.access_log is not None:
            self.access_log.write(record, duration)

    def refused(self, request_id: str, path: str, status: int) -> None:
        """A request turned away before the relay (no valid key). Any path may be asked for, so
        the endpoint label is the path only for the relayed ones: metrics stay bounded."""
        endpoint = path if path in RELAYED_PATHS else OTHER_ENDPOINT
        self.finish(RequestRecord(request_id, endpoint, status=status))

    def admin_action(self, key: str, action: str, model: str, result: str, duration: float) -> None:
        if self.access_log is not None:
            self.access_log.action(key, action, model, result, duration)

    def close(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
