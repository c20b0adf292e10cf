"""Prometheus metrics: what the relay counts per request, and what is read from the pools.

Per request the relay pays for a few dict updates (``GatewayMetrics``); nothing is counted
per chunk. Gauges that describe state (requests in flight, open streams, backend state,
restarts, health-check latency) are not updated on the request path at all: a collector reads
them from the replica pools when /metrics is scraped.

One process, one registry. The gateway runs as one asyncio process (spawn mode must: the
backends belong to it), so there is no multiprocess aggregation to get wrong; more capacity
comes from more gateway replicas, each scraped, summed by Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from backends.lifecycle import BackendState
from backends.on_demand import ModelState, OnDemandModel
from backends.pool import ReplicaPool
from gateway.record import RequestRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    """The per-request series, counted in plain dicts and turned into metric families when
    /metrics is scraped: prometheus_client's labelled children take a lock per update and
    observe histograms in Python, on every request. The relay and the scrape share one event
    loop: no lock needed."""

    def __init__(self, pools: Iterable[ReplicaPool]) -> None:
        self.registry = CollectorRegistry()
        self.requests: dict[tuple[str, str, str, str], int] = {}  # model, endpoint, status, key
        self.duration: dict[tuple[str, str], _Histogram] = {}  # model, endpoint
        self.ttfb: dict[tuple[str, str, str], _Histogram] = {}  # model, endpoint, stream
        self.tokens: dict[tuple[str, str, str], int] = {}  # model, key, kind
        self.registry.register(_RequestCollector(self))
        self.registry.register(PoolCollector(list(pools)))

    def observe(self, record: RequestRecord, duration: float) -> None:
        """One finished request."""
        model, endpoint, key, usage = record.model, record.endpoint, record.key, record.usage
        labels = (model, endpoint, str(record.status), key)
        self.requests[labels] = self.requests.get(labels, 0) + 1
        _observe(self.duration, (model, endpoint), LATENCY_BUCKETS, duration)
        if record.ttfb is not None:
            stream_label = "true" if record.stream else "false"
            _observe(self.ttfb, (model, endpoint, stream_label), TTFB_BUCKETS, record.ttfb)
        if usage is not None:
            for kind, count in (("prompt", usage[0]), ("completion", usage[1])):
                self.tokens[(model, key, kind)] = self.tokens.get((model, key, kind), 0) + count


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)  # per bucket, not cumulative; the last is +Inf
        self.total = 0.0


def _observe(
    histograms: dict[Any, _Histogram], labels: Any, bounds: tuple[float, ...], value: float
) -> None:
    histogram = histograms.get(labels)
    if histogram is None:
        histogram = histograms[labels] = _Histogram(len(bounds))
    histogram.counts[bisect_left(bounds, value)] += 1  # the first bound >= value: `le`
    histogram.total += value


class _RequestCollector(Collector):
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "vllm_gateway_requests",
            "Relayed requests by model, endpoint, HTTP status and API key name.",
            labels=["model", "endpoint", "status", "key"],
        )
        for request_labels, count in list(m.requests.items()):
            requests.add_metric(request_labels, count)
        tokens = CounterMetricFamily(
            "vllm_gateway_tokens",
            "Tokens by model, API key name and kind (prompt, completion), from backend usage.",
            labels=["model", "key", "kind"],
        )
        for token_labels, count in list(m.tokens.items()):
            tokens.add_metric(token_labels, count)
        yield requests
        yield _histogram_family(
            "vllm_gateway_request_duration_seconds",
            "Time from the request's arrival to the last byte of its response.",
            ["model", "endpoint"],
            LATENCY_BUCKETS,
            m.duration,
        )
        yield _histogram_family(
            "vllm_gateway_time_to_first_byte_seconds",
            "Time from a request's arrival to the first body byte sent to the client "
            "(for a stream: its first event).",
            ["model", "endpoint", "stream"],
            TTFB_BUCKETS,
            m.ttfb,
        )
        yield tokens


def _histogram_family(
    name: str,
    documentation: str,
    labels: list[str],
    bounds: tuple[float, ...],
    histograms: dict[Any, _Histogram],
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    edges = [str(float(b)) for b in bounds] + ["+Inf"]  # as prometheus_client writes `le`
    for label_values, histogram in list(histograms.items()):
        buckets = list(zip(edges, accumulate(histogram.counts), strict=True))
        family.add_metric(list(label_values), buckets, histogram.total)
    return family


class PoolCollector(Collector):
    """State read from the pools at scrape time, so the request path never updates it."""

    def __init__(self, pools: list[ReplicaPool]) -> None:
        self.pools = pools
        self.on_demand = _OnDemandSeries()

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "vllm_gateway_requests_in_flight", "Requests being relayed, by model.", labels=["model"]
        )
        streams = GaugeMetricFamily(
            "vllm_gateway_open_streams", "Streams being relayed, by model.", labels=["model"]
        )
        state = GaugeMetricFamily(
            "vllm_gateway_backend_state",
            "1 for each replica's current state (waiting, loading, ready, unhealthy, "
            "restarting, failed, stopped).",
            labels=["model", "replica", "state"],
        )
        restarts = CounterMetricFamily(
            "vllm_gateway_backend_restarts",
            "Times the gateway restarted a replica (spawn mode).",
            labels=["model", "replica"],
        )
        kv_tokens = GaugeMetricFamily(
            "vllm_gateway_kv_cache_tokens",
            "KV cache of each spawned generative replica in tokens: expected from its GPU "
            "slice, actual as vLLM reports it.",
            labels=["model", "replica", "kind"],
        )
        health = GaugeMetricFamily(
            "vllm_gateway_health_check_seconds",
            "Latency of each replica's last health check.",
            labels=["model", "replica"],
        )
        for pool in self.pools:
            in_flight.add_metric([pool.name], sum(r.in_flight for r in pool.replicas))
            streams.add_metric([pool.name], pool.open_streams)
            for label, replica in pool.labelled():
                labels = [pool.name, label]
                for each in BackendState:
                    state.add_metric([*labels, each.value], 1.0 if replica.state is each else 0.0)
                restarts.add_metric(labels, replica.restarts)
                if replica.health_latency is not None:
                    health.add_metric(labels, replica.health_latency)
                cache = replica.kv_cache
                if cache is not None:
                    for kind, tokens in (
                        ("expected", cache.expected_tokens),
                        ("actual", cache.actual_tokens),
                    ):
                        if tokens is not None:
                            kv_tokens.add_metric([*labels, kind], tokens)
        yield from (in_flight, streams, state, restarts, health, kv_tokens)
        yield from self.on_demand.collect([p.on_demand for p in self.pools if p.on_demand])


LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class _OnDemandSeries:
    """On-demand models' states, read at scrape time; their load times are binned as they
    are seen (a model keeps its recent ones only)."""

    def __init__(self) -> None:
        self.load_times: dict[tuple[str], _Histogram] = {}
        self.wake_times: dict[tuple[str], _Histogram] = {}
        self.seen: dict[tuple[str, str], int] = {}  # (model, loads|wakes) -> counted so far

    def collect(self, models: list[OnDemandModel]) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "vllm_gateway_model_state",
            "1 for each on-demand model's current state (stopped, starting, ready, draining, "
            "sleeping, asleep, waking).",
            labels=["model", "state"],
        )
        loads = CounterMetricFamily(
            "vllm_gateway_model_loads", "Starts of each on-demand model.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "vllm_gateway_model_waiting_requests",
            "Requests held while their on-demand model starts.",
            labels=["model"],
        )
        sleeps = CounterMetricFamily(
            "vllm_gateway_model_sleeps", "Times an on-demand model fell asleep.", labels=["model"]
        )
        wakes = CounterMetricFamily(
            "vllm_gateway_model_wakes", "Times an on-demand model woke up.", labels=["model"]
        )
        for model in models:
            for each in ModelState:
                state.add_metric([model.name, each.value], 1.0 if model.state is each else 0.0)
            loads.add_metric([model.name], model.loads)
            sleeps.add_metric([model.name], model.sleeps)
            wakes.add_metric([model.name], model.wakes)
            waiting.add_metric([model.name], model.waiting)
            self._bin(model.name, "loads", model.loads, model.load_times, self.load_times)
            self._bin(model.name, "wakes", model.wakes, model.wake_times, self.wake_times)
        yield from (state, loads, sleeps, wakes, waiting)
        yield _histogram_family(
            "vllm_gateway_model_load_seconds",
            "Time from an on-demand model's start to its first ready server.",
            ["model"],
            LOAD_BUCKETS,
            self.load_times,
        )
        yield _histogram_family(
            "vllm_gateway_model_wake_seconds",
            "Time from an asleep model's wake call to its servers serving again.",
            ["model"],
            LOAD_BUCKETS,
            self.wake_times,
        )

    def _bin(
        self,
        model: str,
        kind: str,
        count: int,
        recent: list[float],
        histograms: dict[tuple[str], _Histogram],
    ) -> None:
        new = count - self.seen.get((model, kind), 0)
        self.seen[(model, kind)] = count
        for seconds in recent[-new:] if new > 0 else []:
            _observe(histograms, (model,), LOAD_BUCKETS, seconds)
