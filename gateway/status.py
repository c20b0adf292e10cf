"""`/status.json`: every backend at a glance, for the status page and for scripts."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from backends.kv_cache import GiB, KvCache
from backends.on_demand import policy_of
from backends.pool import ReplicaPool
from gateway import __version__
from gateway.telemetry import Telemetry


class StatusReport:
    def __init__(
        self,
        pools: Sequence[ReplicaPool],
        aliases: Mapping[str, list[str]],
        modes: Mapping[str, str],
        telemetry: Telemetry,
        swap_groups: Mapping[int, list[tuple[str, str]]] | None = None,
    ) -> None:
        """``swap_groups``: GPU -> pairs of on-demand models that take turns there."""
        self.pools = pools
        self.swap_groups = dict(swap_groups or {})
        self.aliases = aliases
        self.modes = modes
        self.telemetry = telemetry
        self.started = time.monotonic()
        # The config generation in force and the last reload (``gateway.reload``), once wired.
        self.reload: Callable[[], dict[str, Any]] | None = None

    def document(self) -> dict[str, Any]:
        now = time.monotonic()
        models = []
        for pool in self.pools:
            replicas = [
                {
                    "index": i,
                    "replica": label,
                    "url": f"unix:{r.uds}" if r.uds else (r.url or None),
                    "state": str(r.state),
                    "ejected": r.ejected_until > now,
                    "gpus": list(r.gpus),
                    "uptime_s": round(now - r.ready_since, 1) if r.ready_since else None,
                    "restarts": r.restarts,
                    "in_flight": r.in_flight,
                    "vllm_load": None if r.load is None else asdict(r.load),
                    "prefix_cache_hit_rate": None
                    if r.load is None
                    else r.load.prefix_cache_hit_rate,
                    "health_ms": round(r.health_latency * 1000, 2)
                    if r.health_latency is not None
                    else None,
                    "kv_cache": None if r.kv_cache is None else kv_cache_document(r.kv_cache),
                    "adapters": sorted(r.adapters),
                }
                for i, (label, r) in enumerate(pool.labelled())
            ]
            models.append(
                {
                    "name": pool.name,
                    "aliases": self.aliases.get(pool.name, []),
                    "mode": self.modes.get(pool.name, "connect"),
                    "ready": sum(r.ready for r in pool.replicas),
                    "max_model_len": pool.max_model_len,
                    "open_streams": pool.open_streams,
                    "recent": self.telemetry.windows[pool.name].summary(),
                    "on_demand": model_document(pool) if pool.on_demand is not None else None,
                    "replicas": replicas,
                }
            )
        return {
            "gateway": {"version": __version__, "uptime_s": round(now - self.started, 1)},
            "config": self.reload() if self.reload is not None else None,
            "models": models,
            "swap_groups": [
                {"gpu": gpu, "models": list(pair)}
                for gpu, pairs in self.swap_groups.items()
                for pair in pairs
            ],
        }


def model_document(pool: ReplicaPool) -> dict[str, Any]:
    """One model as the admin API and the status page show it."""
    model = policy_of(pool)
    now, wall = time.monotonic(), time.time()
    doc: dict[str, Any] = {
        "name": pool.name,
        "on_demand": model is not None,
        "in_flight": sum(r.in_flight for r in pool.replicas),
        "replicas": [str(r.state) for r in pool.replicas],
    }
    if model is None:
        doc["state"] = "ready" if any(r.ready for r in pool.replicas) else "not ready"
        return doc
    estimate = model.estimate()
    doc.update(
        state=str(model.state),
        since=round(wall - (now - model.state_since), 3),
        last_request=model.last_request,
        last_load_s=round(model.load_times[-1], 2) if model.load_times else None,
        loads=model.loads,
        sleeps=model.sleeps,
        wakes=model.wakes,
        last_wake_s=round(model.wake_times[-1], 2) if model.wake_times else None,
        unload=model.config.unload,
        sleep_level=model.config.sleep_level,
        waiting=model.waiting,
        idle_ttl=model.config.idle_ttl,
        priority=model.config.priority,
        pinned=model.config.pinned,
        swapped_out=model.swapped_out,
        refused=dict(model.refused),
        estimated_wait_s=None if estimate is None else round(estimate, 2),
        costs=model.costs.document(),
    )
    return doc


def kv_cache_document(cache: KvCache) -> dict[str, Any]:
    """Expected (from the slice) and actual (from vLLM) KV cache, in GiB and tokens."""

    def gib(size: float | None) -> float | None:
        return None if size is None else round(size / GiB, 2)

    return {
        "expected_gib": gib(cache.expected_bytes),
        "actual_gib": gib(cache.actual_bytes),
        "expected_tokens": cache.expected_tokens,
        "actual_tokens": cache.actual_tokens,
        "short": cache.short,
    }
