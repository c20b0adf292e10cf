"""The states of a backend replica and the transitions between them, written down once.

Every replica has exactly one writer of its state: the supervisor for servers the gateway
spawns, the health checker for servers it connects to. They change it only through
``Replica.move``, which refuses a transition this table does not list (a bug, not a condition
to handle). The README draws the same machine; ``vllm_gateway_backend_state`` and
``/status.json`` use these names.

    stopped     no server (not started yet, or stopped by the gateway)
      -> waiting      spawn: its GPUs are shared and another server is starting there
      -> loading      spawn: the server is starting (weights, profiling, warm-up)
    waiting     -> loading / restarting once it has the turn (restarting if it is a restart)
    loading     -> ready          /health answers and /v1/models lists the model
                -> restoring      ready, with runtime LoRA adapters to load first
    restoring   -> ready          its runtime adapters are loaded (or reported missing)
                -> restarting     it died or did not become ready in time (failed: no restarts)
    ready       -> restarting     spawn: it died or failed its health checks
                -> unhealthy      connect: failed `unhealthy_threshold` checks in a row
                -> draining       on-demand: being unloaded; no new requests, in-flight ones end
    draining    -> stopped        its requests ended (or `drain_timeout` cut them); server ended
                -> sleeping       on-demand with `unload: sleep`, once no request is in flight
                -> restarting     it died while draining
    sleeping    -> asleep         vLLM's /sleep answered and /is_sleeping says so
    asleep      -> waking         a request (or an admin) wants it again
    waking      -> ready          /wake_up (level 2: weights, reload, KV cache) and not sleeping
    sleeping, asleep, waking -> restarting   it died, failed its checks, or could not wake
    unhealthy   -> ready          connect: passed `healthy_threshold` checks in a row
    joining     -> ready / restoring   discovered: passed its readiness checks (health, model
                                  list), restoring first when it has runtime adapters to load
    joining, ready, unhealthy, restoring -> leaving
                                  discovered: its address left the DNS answer; no new requests
    leaving     -> stopped        its in-flight requests ended; it is removed from the pool
    restarting  -> waiting / ready (its new server is ready) / restoring / failed (too many
                   failed starts)
    failed      the supervisor gave up; only a gateway restart brings it back
    any state   -> stopped        the gateway stops

An on-demand model (``backends.on_demand``) starts in ``stopped`` and returns there when it is
unloaded; its replicas take the same path as an always-on model's in between.

A discovered replica (``backends.discovery``) starts in ``joining`` and ends in ``stopped``
after ``leaving``; the health checker is its one writer until it leaves, the discovery after.
"""

from __future__ import annotations

from enum import StrEnum


class BackendState(StrEnum):
    STOPPED = "stopped"
    WAITING = "waiting"  # for its start-up turn on a GPU it shares (spawn mode)
    LOADING = "loading"
    READY = "ready"
    UNHEALTHY = "unhealthy"  # failing its health checks (connect mode)
    RESTARTING = "restarting"
    DRAINING = "draining"  # on-demand: unloading, in-flight requests finish first
    SLEEPING = "sleeping"  # vLLM's sleep mode: going to sleep
    ASLEEP = "asleep"  # weights offloaded or dropped, KV cache freed; the process lives
    WAKING = "waking"
    RESTORING = "restoring"  # ready, loading its runtime LoRA adapters before it is admitted
    JOINING = "joining"  # discovered: found in DNS, not yet admitted
    LEAVING = "leaving"  # discovered: gone from DNS, its in-flight requests finish
    FAILED = "failed"


S = BackendState
TRANSITIONS: dict[BackendState, frozenset[BackendState]] = {
    S.STOPPED: frozenset({S.WAITING, S.LOADING}),
    S.WAITING: frozenset({S.LOADING, S.RESTARTING}),
    S.LOADING: frozenset({S.READY, S.RESTORING, S.RESTARTING, S.FAILED}),
    S.RESTORING: frozenset({S.READY, S.RESTARTING, S.LEAVING}),
    S.READY: frozenset({S.RESTARTING, S.UNHEALTHY, S.DRAINING, S.LEAVING}),
    S.DRAINING: frozenset({S.RESTARTING, S.SLEEPING}),
    S.SLEEPING: frozenset({S.ASLEEP, S.RESTARTING}),
    S.ASLEEP: frozenset({S.WAKING, S.RESTARTING}),
    S.WAKING: frozenset({S.READY, S.RESTARTING}),
    S.UNHEALTHY: frozenset({S.READY, S.RESTORING, S.LEAVING}),
    S.JOINING: frozenset({S.READY, S.RESTORING, S.LEAVING}),
    S.LEAVING: frozenset(),
    S.RESTARTING: frozenset({S.WAITING, S.READY, S.RESTORING, S.FAILED}),
    S.FAILED: frozenset(),
}
# Clients should retry soon.
ON_ITS_WAY = frozenset({S.WAITING, S.LOADING, S.RESTARTING, S.RESTORING, S.JOINING})


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds before the next start after ``failures`` failed ones in a row: doubling from
    ``base`` up to ``cap`` (restarts and on-demand starts alike)."""
    return min(cap, base * 2.0 ** max(0, failures - 1))


class InvalidTransition(RuntimeError):
    """A writer asked for a move the table does not allow: a bug in that writer."""


def check(current: BackendState, target: BackendState) -> None:
    if target is not current and target is not S.STOPPED and target not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current} -> {target} is not a backend transition")
