"""A request's place in its model's queue: its priority and key, and what vLLM is told.

The relay asks for a ``Ticket`` only for a model with a queue or whose servers schedule by
priority (``ReplicaPool.queue``, ``ReplicaPool.priority_field``); for every other model this
module costs nothing. The queue itself is ``backends.queues``; this side knows the keys, the
header and the config.

    priority   the key's `priority`, or the `x-vllm-gateway-priority` header's within the key's
               `priority_range` (400 when unreadable, 403 when outside); without keys, any
    key        its name (requests without a key share one turn), and its `weight`
    vLLM       with `--scheduling-policy priority` in the model's `vllm.args`, the body's
               `priority` is set to the same number (vLLM reads it there; lower goes first),
               whatever the client wrote; vLLM's own `x-vllm-priority` header, which would win
               over the body, is never passed on (``gateway.upstream``)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson

from backends.life import ModelLife
from backends.pool import ReplicaPool
from backends.queues import QueueLimits
from gateway.errors import PriorityNotAllowed
from gateway.job import Job
from gateway.keys import ApiKey
from gateway.model_settings import ModelSettings
from gateway.routing import JSON_PATHS
from gateway.settings import GatewaySettings
from gateway.traffic.priorities import PRIORITY_HEADER, describe, parse
from gateway.traffic.queue_settings import QueueSettings

# The relayed paths whose vLLM request has a `priority` field (the pooling ones included).
PRIORITY_PATHS = JSON_PATHS - {
    "/tokenize",
    "/detokenize",
    "/v1/messages",
    "/v1/messages/count_tokens",
}
SCHEDULING_POLICY = ("scheduling-policy", "scheduling_policy")  # vLLM takes either spelling


@dataclass(frozen=True, slots=True)
class Ticket:
    """Where a request waits in its model's queue."""

    priority: int = 0
    key: str = ""  # the key's name; "" for a gateway without keys
    weight: float = 1.0


def ticket(key: ApiKey | None, header: bytes | None) -> Ticket:
    """The request's priority, key and weight; gateway errors for a header that will not do."""
    if key is None:
        return Ticket(parse(header) if header is not None else 0)
    if header is None:
        return Ticket(key.priority, key.name, key.weight)
    asked = parse(header)
    first, last = key.priorities
    if not first <= asked <= last:
        raise PriorityNotAllowed(
            f"Key {key.name!r} may ask for priorities from {describe(first)} to "
            f"{describe(last)} ({PRIORITY_HEADER.decode()}); this request asked for "
            f"{describe(asked)}."
        )
    return Ticket(asked, key.name, key.weight)


def with_priority(job: Job, path: str, priority: int) -> Job:
    """The job whose body tells vLLM ``priority`` (re-encoded only when it says otherwise)."""
    if path not in PRIORITY_PATHS:
        return job
    if priority == 0 and b'"priority"' not in job.body:  # vLLM's default: nothing to say
        return job
    doc = orjson.loads(job.body)
    said = doc.get("priority", 0)
    if type(said) is int and said == priority:
        return job
    return replace(job, body=orjson.dumps({**doc, "priority": priority}))


def queue_limits(model: ModelSettings, settings: GatewaySettings) -> QueueLimits:
    """`models[].queue`, with `on_demand.max_waiting` where that is still used instead."""
    queue = model.queue or QueueSettings()
    max_waiting = queue.max_waiting
    on_demand = model.on_demand
    if on_demand is not None and "max_waiting" not in queue.model_fields_set:
        max_waiting = on_demand.max_waiting
    return QueueLimits(
        max_in_flight=queue.max_in_flight,
        max_waiting=max_waiting,
        max_wait=queue.max_wait,
        retry_after_starting=settings.retry_after.loading,
        reserved=queue.reservations(),
    )


def use_queue(
    pool: ReplicaPool, life: ModelLife, model: ModelSettings, settings: GatewaySettings
) -> None:
    """The model's queue limits and priorities, at start and on a reload (in place: requests
    waiting stay where they are)."""
    life.queue.configure(queue_limits(model, settings))
    capped = model.queue is not None and model.queue.max_in_flight is not None
    pool.queue = life.queue if capped or model.on_demand is not None else None
    pool.priority_field = priority_scheduling(model)


def priority_scheduling(model: ModelSettings) -> bool:
    """Its spawned servers run `--scheduling-policy priority` (connect mode: not known)."""
    if model.vllm is None:
        return False
    args = model.vllm.args
    return any(args.get(flag) == "priority" for flag in SCHEDULING_POLICY)
