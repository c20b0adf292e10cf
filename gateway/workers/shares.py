"""Each worker's share of what /metrics and /status.json show, and their sum.

A worker counts the requests it relays (``gateway.metrics``, ``gateway.telemetry``); the
control plane, which answers /metrics and /status.json, asks every worker for its share just
before (``share``: a plain document) and adds them up (``Totals``). Counters stay monotonic
across a worker's death: the last share a dead worker gave is kept (``retire``), and its
replacement counts from zero on top of it; what it counted after its last share is lost with
it. Requests in flight are not part of a share: the control plane reads them from the shared
table (``gateway.workers.counters``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import fields
from typing import Any

from backends.pool import Replica, ReplicaPool
from gateway.histograms import Histogram
from gateway.metrics import (
    LATENCY_BUCKETS,
    QUEUE_BUCKETS,
    TTFB_BUCKETS,
    RequestCounts,
    SpanCounts,
)
from gateway.telemetry import RecentWindow, Telemetry

Share = dict[str, Any]


def share(telemetry: Telemetry, pools: Iterable[ReplicaPool]) -> Share:
    """What one worker has counted since it started, and what it relays now."""
    counts = telemetry.metrics.counts()
    now = time.monotonic()
    return {
        "requests": [[*labels, n] for labels, n in counts.requests.items()],
        "key_requests": [[*labels, n] for labels, n in counts.key_requests.items()],
        "fallbacks": [[*labels, n] for labels, n in counts.fallbacks.items()],
        "tokens": [[*labels, n] for labels, n in counts.tokens.items()],
        "duration": [[list(k), h.counts, h.total] for k, h in counts.duration.items()],
        "ttfb": [[list(k), h.counts, h.total] for k, h in counts.ttfb.items()],
        "queue_wait": [[list(k), h.counts, h.total] for k, h in counts.queue_wait.items()],
        "streams": {pool.name: pool.open_streams for pool in pools},
        "spans": _spans(telemetry),
        "prefix": [  # balance: prefix, how each replica was chosen (by its slot)
            [pool.name, getattr(replica, "slot", None), route, n]
            for pool in pools
            if pool.prefix is not None
            for (replica, route), n in pool.prefix.routed.items()
        ],
        "recent": {name: window.recent(now) for name, window in telemetry.windows.items()},
    }


class Totals:
    """The control plane's sum of its workers' shares (and of its own counts)."""

    def __init__(self) -> None:
        # The last shares of workers that died: what they counted stays counted.
        self.retired = RequestCounts()
        self.retired_spans = [0, 0, 0]
        self.retired_prefix: dict[tuple[str, int, str], int] = {}

    def retire(self, last: Share | None) -> None:
        if last is not None:
            _add(self.retired, last)
            self.retired_spans = _plus(self.retired_spans, last["spans"])
            _add_prefix(self.retired_prefix, last["prefix"])

    def apply(
        self,
        telemetry: Telemetry,
        pools: list[ReplicaPool],
        shares: list[Share],
        replica_of: Callable[[int], Replica | None] = lambda slot: None,
    ) -> None:
        """Into ``telemetry`` and ``pools`` for the next scrape or status document: the
        request series, trace exports, prefix routes, open streams and recent windows of
        every worker (``replica_of``: the control plane's replica of a slot)."""
        total = RequestCounts()
        _add_counts(total, telemetry.metrics.counts())  # refused at the control plane's door
        _add_counts(total, self.retired)
        for each in shares:
            _add(total, each)
        telemetry.metrics.merged = total
        spans = _plus(self.retired_spans, _spans(telemetry))
        for each in shares:
            spans = _plus(spans, each["spans"])
        telemetry.metrics.merged_spans = SpanCounts(*spans)
        prefix = dict(self.retired_prefix)
        for each in shares:
            _add_prefix(prefix, each["prefix"])
        _route_counts(pools, prefix, replica_of)
        for pool in pools:
            pool.open_streams = sum(s["streams"].get(pool.name, 0) for s in shares)
        windows = {}
        for pool in pools:
            window = windows[pool.name] = RecentWindow()
            samples = sorted(x for s in shares for x in s["recent"].get(pool.name, []))
            for at, duration, tokens in samples:
                window.add_at(at, duration, tokens)
        telemetry.windows = windows


def _plus(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b, strict=True)]


def _spans(telemetry: Telemetry) -> list[int]:
    tracing = telemetry.tracing
    if tracing is None:
        return [0, 0, 0]
    return [getattr(tracing.counts, f.name) for f in fields(SpanCounts)]


def _add_prefix(total: dict[tuple[str, int, str], int], rows: list[list[Any]]) -> None:
    for model, slot, route, n in rows:
        if slot is not None:
            total[(model, slot, route)] = total.get((model, slot, route), 0) + n


def _route_counts(
    pools: list[ReplicaPool],
    counts: dict[tuple[str, int, str], int],
    replica_of: Callable[[int], Replica | None],
) -> None:
    """The control plane routes nothing itself: its prefix indexes' counts become the sum
    of its workers'."""
    routed: dict[str, dict[tuple[Replica, Any], int]] = {}
    for (model, slot, route), n in counts.items():
        replica = replica_of(slot)
        if replica is not None:
            per_model = routed.setdefault(model, {})
            per_model[(replica, route)] = per_model.get((replica, route), 0) + n
    for pool in pools:
        if pool.prefix is not None:
            pool.prefix.routed = routed.get(pool.name, {})


def _add(total: RequestCounts, share: Share) -> None:
    counts = RequestCounts()
    for model, endpoint, status, n in share["requests"]:
        counts.requests[(model, endpoint, status)] = n
    for model, endpoint, status, key, n in share["key_requests"]:
        counts.key_requests[(model, endpoint, status, key)] = n
    for model, to, reason, n in share["fallbacks"]:
        counts.fallbacks[(model, to, reason)] = n
    for model, key, kind, n in share["tokens"]:
        counts.tokens[(model, key, kind)] = n
    for (model, endpoint), buckets, seconds in share["duration"]:
        _histogram(counts.duration, (model, endpoint), len(LATENCY_BUCKETS)).add(buckets, seconds)
    for (model, endpoint, stream), buckets, seconds in share["ttfb"]:
        labels = (model, endpoint, stream)
        _histogram(counts.ttfb, labels, len(TTFB_BUCKETS)).add(buckets, seconds)
    for (model,), buckets, seconds in share["queue_wait"]:
        _histogram(counts.queue_wait, (model,), len(QUEUE_BUCKETS)).add(buckets, seconds)
    _add_counts(total, counts)


def _add_counts(total: RequestCounts, counts: RequestCounts) -> None:
    for key, n in counts.requests.items():
        total.requests[key] = total.requests.get(key, 0) + n
    for by_key, n in counts.key_requests.items():
        total.key_requests[by_key] = total.key_requests.get(by_key, 0) + n
    for moved, n in counts.fallbacks.items():
        total.fallbacks[moved] = total.fallbacks.get(moved, 0) + n
    for token_key, n in counts.tokens.items():
        total.tokens[token_key] = total.tokens.get(token_key, 0) + n
    for labels, h in counts.duration.items():
        _histogram(total.duration, labels, len(LATENCY_BUCKETS)).add(h.counts, h.total)
    for ttfb_labels, h in counts.ttfb.items():
        _histogram(total.ttfb, ttfb_labels, len(TTFB_BUCKETS)).add(h.counts, h.total)
    for model, h in counts.queue_wait.items():
        _histogram(total.queue_wait, model, len(QUEUE_BUCKETS)).add(h.counts, h.total)


def _histogram(histograms: dict[Any, Histogram], labels: Any, buckets: int) -> Histogram:
    found = histograms.get(labels)
    if found is None:
        found = histograms[labels] = Histogram(buckets)
    return found
