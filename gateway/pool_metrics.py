"""The series read from the replica pools when /metrics is scraped (``PoolCollector``): backend
and model states, requests in flight, queues, on-demand models' loads and wakes, prefix
routing. Nothing on the request path updates them."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.lifecycle import MODEL_STATES, REPLICA_STATES
from backends.on_demand import OnDemandModel, policy_of
from backends.pool import ReplicaPool
from backends.prefix_index import ROUTES
from gateway.histograms import Histogram, histogram_family, observe


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
        prefix_routes = CounterMetricFamily(
            "vllm_gateway_prefix_routes",
            "Requests of models with balance: prefix, by replica and how it was chosen: prefix "
            "(it holds the longest prefix), load (it was too loaded: least outstanding chose), "
            "new (no replica held a prefix: least outstanding chose).",
            labels=["model", "replica", "route"],
        )
        for pool in self.pools:
            in_flight.add_metric([pool.name], sum(r.in_flight for r in pool.replicas))
            streams.add_metric([pool.name], pool.open_streams)
            for label, replica in pool.labelled():
                labels = [pool.name, label]
                for each in REPLICA_STATES:
                    state.add_metric([*labels, each.value], 1.0 if replica.state is each else 0.0)
                restarts.add_metric(labels, replica.restarts)
                if pool.prefix is not None:
                    for route in ROUTES:
                        count = pool.prefix.routed.get((replica, route), 0)
                        prefix_routes.add_metric([*labels, route], count)
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
        yield from (in_flight, streams, state, restarts, health, kv_tokens, prefix_routes)
        yield from _queue_series(self.pools)
        yield from self.on_demand.collect([m for p in self.pools if (m := policy_of(p))])


def _queue_series(pools: list[ReplicaPool]) -> Iterator[Metric]:
    """The queues of models that have one (`queue.max_in_flight`, or on demand)."""
    length = GaugeMetricFamily(
        "vllm_gateway_queue_length",
        "Requests waiting in each model's queue (for their turn, or for an on-demand start).",
        labels=["model"],
    )
    rejections = CounterMetricFamily(
        "vllm_gateway_queue_rejections",
        "Requests a model's queue refused, by reason: queue_full (max_waiting), "
        "queue_timeout (max_wait).",
        labels=["model", "reason"],
    )
    for pool in pools:
        if pool.queue is None:
            continue
        length.add_metric([pool.name], pool.queue.waiting)
        for reason, count in pool.queue.refused.items():
            rejections.add_metric([pool.name, reason], count)
    yield from (length, rejections)


LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class _OnDemandSeries:
    """On-demand models' states, read at scrape time; their load times are binned as they
    are seen (a model keeps its recent ones only)."""

    def __init__(self) -> None:
        self.load_times: dict[tuple[str], Histogram] = {}
        self.wake_times: dict[tuple[str], Histogram] = {}
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
        costs = GaugeMetricFamily(
            "vllm_gateway_model_cost_seconds",
            "What each phase of a swap takes an on-demand model, as the gateway estimates it "
            "(start, wake_1, wake_2, sleep_1_first, sleep_1, sleep_2, stop).",
            labels=["model", "phase"],
        )
        rates = GaugeMetricFamily(
            "vllm_gateway_model_service_rate",
            "Requests and generated tokens an on-demand model serves per second while it has "
            "requests in flight.",
            labels=["model", "unit"],
        )
        estimate = GaugeMetricFamily(
            "vllm_gateway_model_estimated_wait_seconds",
            "How long a request arriving now would wait for its on-demand model.",
            labels=["model"],
        )
        swapped = CounterMetricFamily(
            "vllm_gateway_model_swapped_out",
            "Times a swap unloaded an on-demand model to make room for another.",
            labels=["model"],
        )
        refused = CounterMetricFamily(
            "vllm_gateway_model_refused",
            "Requests refused 503 for their max wait: at once (deadline: the estimate was "
            "longer) or once it passed while they waited (deadline_passed).",
            labels=["model", "reason"],
        )
        for model in models:
            for phase, seconds in model.costs.phases.items():
                if seconds.value is not None:
                    costs.add_metric([model.name, phase], seconds.value)
            for unit, rate in (
                ("requests", model.costs.service.requests_per_s),
                ("tokens", model.costs.service.tokens_per_s),
            ):
                if rate is not None:
                    rates.add_metric([model.name, unit], rate)
            if (waits := model.estimate()) is not None:
                estimate.add_metric([model.name], waits)
            swapped.add_metric([model.name], model.swapped_out)
            for reason, count in model.refused.items():
                refused.add_metric([model.name, reason], count)
            for each in MODEL_STATES:
                state.add_metric([model.name, each.value], 1.0 if model.state is each else 0.0)
            loads.add_metric([model.name], model.loads)
            sleeps.add_metric([model.name], model.sleeps)
            wakes.add_metric([model.name], model.wakes)
            waiting.add_metric([model.name], model.waiting)
            self._bin(model.name, "loads", model.loads, model.load_times, self.load_times)
            self._bin(model.name, "wakes", model.wakes, model.wake_times, self.wake_times)
        yield from (state, loads, sleeps, wakes, waiting, costs, rates, estimate, swapped, refused)
        yield histogram_family(
            "vllm_gateway_model_load_seconds",
            "Time from an on-demand model's start to its first ready server.",
            ["model"],
            LOAD_BUCKETS,
            self.load_times,
        )
        yield histogram_family(
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
        histograms: dict[tuple[str], Histogram],
    ) -> None:
        new = count - self.seen.get((model, kind), 0)
        self.seen[(model, kind)] = count
        for seconds in recent[-new:] if new > 0 else []:
            observe(histograms, (model,), LOAD_BUCKETS, seconds)
