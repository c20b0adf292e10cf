"""What the control plane tells its workers about the models: the routes and every replica.

One document for the whole table, rebuilt from the control plane's pools whenever something
may have changed and sent only when it differs from the last one sent (``gateway.workers.
plane``). It carries what a worker needs to route and pick (names, aliases, balancing, the
replicas' addresses, keys, states, ejections, vLLM's load figures, whether requests take a
turn in the model's queue) and nothing it does not
(health latencies, GPU books, the on-demand policy's clocks). Each replica is named by its slot
in the shared in-flight table (``gateway.workers.counters``), which is how a worker's mirror
(``gateway.workers.mirror``) recognises it across documents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from backends.pool import Replica, ReplicaPool
from gateway.model_settings import ModelSettings

Document = dict[str, Any]


def table_document(
    pools: list[ReplicaPool],
    models: Mapping[str, ModelSettings],
    slot: Callable[[Replica], int | None],
) -> Document:
    """``pools``: the routed ones, in order; ``models``: their settings by name (aliases and
    configured adapters); ``slot``: each replica's slot in the in-flight table."""
    return {"models": [_model(pool, models.get(pool.name), slot) for pool in pools]}


def _model(
    pool: ReplicaPool, settings: ModelSettings | None, slot: Callable[[Replica], int | None]
) -> Document:
    life = pool.life
    return {
        "name": pool.name,
        "aliases": list(settings.aliases) if settings is not None else [],
        "adapters": list(settings.adapter_names) if settings is not None else [],
        "policy": pool.policy,
        "affinity_header": pool.affinity_header.decode("latin-1"),
        "prefix": asdict(pool.prefix.policy) if pool.prefix is not None else None,
        "on_demand": pool.on_demand is not None,
        "state": str(life.state) if life is not None else "ready",
        "hold_for": pool.hold_for,
        "queue": _queue(pool),
        "priority_field": pool.priority_field,
        "replicas": [_replica(r, slot(r)) for r in pool.replicas],
    }


def _queue(pool: ReplicaPool) -> Document | None:
    """Whether its requests take a turn in its queue, the control plane's (a worker asks for
    each one: ``gateway.workers.turns``), and whether the queue caps requests in flight (else
    only a model that does not serve holds them)."""
    if pool.queue is None:
        return None
    return {"capped": pool.queue.limits.max_in_flight is not None}


def _replica(replica: Replica, slot: int | None) -> Document:
    return {
        "slot": slot,
        "url": replica.url,
        "uds": replica.uds,
        "api_key": replica.api_key,
        "state": str(replica.state),
        "ready_since": replica.ready_since,
        "identity": replica.identity,
        "address": replica.address,
        "adapters": sorted(replica.adapters),
        "ejected_until": replica.ejected_until,
        "eject": [replica.ejection.after, replica.ejection.seconds],
        "load": asdict(replica.load) if replica.load is not None else None,
    }
