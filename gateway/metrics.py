"""Prometheus metrics: what the relay counts per request, and what is read from the pools.

Per request the relay pays for a few counter and histogram updates on cached label children;
nothing is counted per chunk. Gauges that describe state (requests in flight, open streams,
backend state, restarts, health-check latency) are not updated on the request path at all: a
collector reads them from the replica pools when /metrics is scraped.

One process, one registry. The gateway runs as one asyncio process (spawn mode must: the
backends belong to it), so there is no multiprocess aggregation to get wrong; more capacity
comes from more gateway replicas, each scraped, summed by Prometheus.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.pool import BackendState, ReplicaPool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self, pools: Iterable[ReplicaPool]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "vllm_gateway_requests",
            "Relayed requests by model, endpoint, HTTP status and API key name.",
            ["model", "endpoint", "status", "key"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "vllm_gateway_request_duration_seconds",
            "Time from the request's arrival to the last byte of its response.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "vllm_gateway_time_to_first_byte_seconds",
            "Time from a request's arrival to the first body byte sent to the client "
            "(for a stream: its first event).",
            ["model", "endpoint", "stream"],
            buckets=TTFB_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "vllm_gateway_tokens",
            "Tokens by model, API key name and kind (prompt, completion), from backend usage.",
            ["model", "key", "kind"],
            registry=self.registry,
        )
        self.registry.register(PoolCollector(list(pools)))
        self._children: dict[tuple[str, ...], Any] = {}

    def observe(
        self,
        model: str,
        endpoint: str,
        status: int,
        key: str,
        duration: float,
        ttfb: float | None,
        stream: bool,
        usage: tuple[int, int] | None,
    ) -> None:
        """One finished request. Label children are cached: a dict lookup, not a label parse."""
        child = self._child
        child(self.requests, model, endpoint, str(status), key).inc()
        child(self.duration, model, endpoint).observe(duration)
        if ttfb is not None:
            child(self.ttfb, model, endpoint, "true" if stream else "false").observe(ttfb)
        if usage is not None:
            child(self.tokens, model, key, "prompt").inc(usage[0])
            child(self.tokens, model, key, "completion").inc(usage[1])

    def _child(self, metric: Any, *labels: str) -> Any:
        cache_key = (metric._name, *labels)
        found = self._children.get(cache_key)
        if found is None:
            found = self._children[cache_key] = metric.labels(*labels)
        return found


class PoolCollector(Collector):
    """State read from the pools at scrape time, so the request path never updates it."""

    def __init__(self, pools: list[ReplicaPool]) -> None:
        self.pools = pools

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            "vllm_gateway_requests_in_flight", "Requests being relayed, by model.", labels=["model"]
        )
        streams = GaugeMetricFamily(
            "vllm_gateway_open_streams", "Streams being relayed, by model.", labels=["model"]
        )
        state = GaugeMetricFamily(
            "vllm_gateway_backend_state",
            "1 for each replica's current state (loading, ready, restarting, failed, stopped).",
            labels=["model", "replica", "state"],
        )
        restarts = CounterMetricFamily(
            "vllm_gateway_backend_restarts",
            "Times the gateway restarted a replica (spawn mode).",
            labels=["model", "replica"],
        )
        health = GaugeMetricFamily(
            "vllm_gateway_health_check_seconds",
            "Latency of each replica's last health check.",
            labels=["model", "replica"],
        )
        for pool in self.pools:
            in_flight.add_metric([pool.name], sum(r.in_flight for r in pool.replicas))
            streams.add_metric([pool.name], pool.open_streams)
            for index, replica in enumerate(pool.replicas):
                labels = [pool.name, str(index)]  # stable, unlike a spawned server's port
                for each in BackendState:
                    state.add_metric([*labels, each.value], 1.0 if replica.state is each else 0.0)
                restarts.add_metric(labels, replica.restarts)
                if replica.health_latency is not None:
                    health.add_metric(labels, replica.health_latency)
        yield from (in_flight, streams, state, restarts, health)
