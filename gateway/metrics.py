"""Prometheus metrics: what the relay counts per request, and what is read from the pools.

Per request the relay pays for a few dict updates (``GatewayMetrics``); nothing is counted
per chunk. Gauges that describe state (requests in flight, open streams, backend state,
restarts, health-check latency) are not updated on the request path at all: a collector reads
them from the replica pools when /metrics is scraped (``gateway.pool_metrics``).

One registry per process. A gateway of several workers (``workers: N``) counts each request
in the worker that relayed it; its control plane, which serves /metrics, asks every worker for
its counts before it answers and shows their sum (``merged``, ``gateway.workers.shares``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from backends.pool import ReplicaPool
from gateway.histograms import Histogram, histogram_family, observe
from gateway.pool_metrics import PoolCollector
from gateway.record import RequestRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class GatewayMetrics:
    """The per-request series, counted in plain dicts and turned into metric families when
    /metrics is scraped: prometheus_client's labelled children take a lock per update and
    observe histograms in Python, on every request. The relay and the scrape share one event
    loop: no lock needed."""

    def __init__(self, pools: list[ReplicaPool], requests_by_key: bool = False) -> None:
        """``requests_by_key`` (`metrics.requests_by_key`): requests get a `key` label too, a
        series per key (thousands of keys make /metrics megabytes; tokens have it always)."""
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, str, str], int] = {}  # model, endpoint, status
        self.key_requests: dict[tuple[str, str, str, str], int] = {}  # ..., key (by key only)
        self._by_key = requests_by_key
        self.fallbacks: dict[tuple[str, str, str], int] = {}  # model, to, reason
        self.duration: dict[tuple[str, str], Histogram] = {}  # model, endpoint
        self.ttfb: dict[tuple[str, str, str], Histogram] = {}  # model, endpoint, stream
        self.tokens: dict[tuple[str, str, str], int] = {}  # model, key, kind
        self.queue_wait: dict[tuple[str], Histogram] = {}  # model
        # What /metrics shows instead of this process's own counts: all workers' together,
        # set by a control plane before each scrape (``gateway.workers``).
        self.merged: RequestCounts | None = None
        self.merged_spans: SpanCounts | None = None  # likewise, the trace exporters' counts
        self.registry.register(_RequestCollector(self))
        self.registry.register(PoolCollector(pools))  # the gateway's list, read at each scrape

    def counts(self) -> RequestCounts:
        """This process's counts (the same dicts, not a copy)."""
        return RequestCounts(
            self.requests,
            self.duration,
            self.ttfb,
            self.tokens,
            self.key_requests,
            self.fallbacks,
            self.queue_wait,
        )

    def count_spans(self, counts: SpanCounts) -> None:
        """Tracing is on: what its exporter does with the spans shows in /metrics too."""
        self.registry.register(_SpanCollector(counts, self))

    @property
    def requests_by_key(self) -> bool:
        return self._by_key

    @requests_by_key.setter
    def requests_by_key(self, on: bool) -> None:
        """A reload may turn it on (each key's series starts at 0) or off (they go)."""
        self._by_key = on
        if not on:
            self.key_requests.clear()

    def observe(self, record: RequestRecord, duration: float) -> None:
        """One finished request."""
        model, endpoint, key, usage = record.model, record.endpoint, record.key, record.usage
        labels = (model, endpoint, str(record.status))
        self.requests[labels] = self.requests.get(labels, 0) + 1
        if self._by_key:
            by_key = (*labels, key)
            self.key_requests[by_key] = self.key_requests.get(by_key, 0) + 1
        if record.fallbacks is not None:
            for move in record.fallbacks:
                moved = (move.model, move.to, move.reason)
                self.fallbacks[moved] = self.fallbacks.get(moved, 0) + 1
        observe(self.duration, (model, endpoint), LATENCY_BUCKETS, duration)
        if record.ttfb is not None:
            stream_label = "true" if record.stream else "false"
            observe(self.ttfb, (model, endpoint, stream_label), TTFB_BUCKETS, record.ttfb)
        if record.queue_wait is not None:
            observe(self.queue_wait, (model,), QUEUE_BUCKETS, record.queue_wait)
        if usage is not None:
            for kind, count in (("prompt", usage[0]), ("completion", usage[1])):
                if count:  # an embedder's completions: no series of zeros per key
                    series = (model, key, kind)
                    self.tokens[series] = self.tokens.get(series, 0) + count


@dataclass(slots=True)
class RequestCounts:
    """The per-request series, as ``GatewayMetrics`` counts them."""

    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    duration: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    ttfb: dict[tuple[str, str, str], Histogram] = field(default_factory=dict)
    tokens: dict[tuple[str, str, str], int] = field(default_factory=dict)
    key_requests: dict[tuple[str, str, str, str], int] = field(default_factory=dict)
    fallbacks: dict[tuple[str, str, str], int] = field(default_factory=dict)
    queue_wait: dict[tuple[str], Histogram] = field(default_factory=dict)  # model


@dataclass(slots=True)
class SpanCounts:
    """What the trace exporter did with the spans it was handed (``gateway.tracing`` counts,
    each count from one thread only; /metrics reads)."""

    exported: int = 0
    queue_full: int = 0  # dropped: the export queue was full (the collector is slow or down)
    export_failed: int = 0  # dropped: the collector refused them or could not be reached


class _SpanCollector(Collector):
    def __init__(self, counts: SpanCounts, metrics: GatewayMetrics) -> None:
        self.own = counts
        self.metrics = metrics

    @property
    def counts(self) -> SpanCounts:
        return self.metrics.merged_spans or self.own

    def collect(self) -> Iterator[Metric]:
        exported = CounterMetricFamily(
            "vllm_gateway_trace_spans_exported", "Spans the trace exporter delivered."
        )
        exported.add_metric([], self.counts.exported)
        dropped = CounterMetricFamily(
            "vllm_gateway_trace_spans_dropped",
            "Spans the trace exporter dropped, by reason (queue_full, export_failed).",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], self.counts.queue_full)
        dropped.add_metric(["export_failed"], self.counts.export_failed)
        yield exported
        yield dropped


class _RequestCollector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics.merged or self.metrics.counts()
        if self.metrics.requests_by_key:
            requests = CounterMetricFamily(
                "vllm_gateway_requests",
                "Relayed requests by model, endpoint, HTTP status and API key name.",
                labels=["model", "endpoint", "status", "key"],
            )
            for key_labels, count in list(m.key_requests.items()):
                requests.add_metric(key_labels, count)
        else:
            requests = CounterMetricFamily(
                "vllm_gateway_requests",
                "Relayed requests by model, endpoint and HTTP status.",
                labels=["model", "endpoint", "status"],
            )
            for request_labels, count in list(m.requests.items()):
                requests.add_metric(request_labels, count)
        fallbacks = CounterMetricFamily(
            "vllm_gateway_fallbacks",
            "Requests moved from a model to a fallback, by the reason (unavailable, "
            "overloaded, timeout, context_length); a request moved twice counts twice.",
            labels=["model", "to", "reason"],
        )
        for moved, count in list(m.fallbacks.items()):
            fallbacks.add_metric(moved, count)
        tokens = CounterMetricFamily(
            "vllm_gateway_tokens",
            "Tokens by model, API key name and kind (prompt, completion), from backend usage.",
            labels=["model", "key", "kind"],
        )
        for token_labels, count in list(m.tokens.items()):
            tokens.add_metric(token_labels, count)
        yield requests
        yield fallbacks
        yield histogram_family(
            "vllm_gateway_request_duration_seconds",
            "Time from the request's arrival to the last byte of its response.",
            ["model", "endpoint"],
            LATENCY_BUCKETS,
            m.duration,
        )
        yield histogram_family(
            "vllm_gateway_time_to_first_byte_seconds",
            "Time from a request's arrival to the first body byte sent to the client "
            "(for a stream: its first event).",
            ["model", "endpoint", "stream"],
            TTFB_BUCKETS,
            m.ttfb,
        )
        yield histogram_family(
            "vllm_gateway_queue_wait_seconds",
            "Time a request waited in its model's queue for its turn (an on-demand start "
            "included), for models with a queue.",
            ["model"],
            QUEUE_BUCKETS,
            m.queue_wait,
        )
        yield tokens
