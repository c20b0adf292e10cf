"""The states of a model and of its replicas, and the transitions between them, written once.

One table covers both levels. Each model has one writer of its state and of its replicas'
states: its ``backends.life.ModelLife``, which applies the moves others ask for (the process
supervisor, the health checker, discovery, the on-demand policy and its swaps, the admin API)
one at a time and refuses a transition this table does not list (a bug, not a condition to
handle). ``vllm_gateway_backend_state``, ``vllm_gateway_model_state`` and ``/status.json`` use
these names.

A replica (one vLLM server):

    stopped     no server (not started yet, or stopped by the gateway)
      -> waiting      spawn: its GPUs are shared and another server is starting there
      -> loading      spawn: the server is starting (weights, profiling, warm-up)
      -> asleep       spawn, on demand: adopted asleep, a server the last gateway left sleeping
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

A replica of an on-demand model that dies while its model is being unloaded (draining, falling
asleep, asleep) is not restarted: its life moves it to ``stopped``, so the swap books count
nothing for it, and the model's next wake starts it again.

An on-demand model (``backends.on_demand``), the model level:

    stopped   -> starting    a request or an admin asked for it; room was made on its GPUs
              -> asleep      its servers the last gateway left sleeping were adopted asleep
    starting  -> ready       one of its servers is ready
              -> stopped     the start failed or outlasted `start_timeout`
    ready     -> draining    idle for `idle_ttl`, an admin unload, or a swap needs its GPUs
    draining  -> sleeping    `unload: sleep`, once nothing is in flight
              -> stopped     its servers ended
    sleeping  -> asleep      its servers sleep (one that could not was stopped)
              -> stopped     none fell asleep
    asleep    -> waking      a request or an admin wants it again
              -> stopped     a swap needs even the little it holds asleep, or an admin
    waking    -> ready       its servers woke (or started again, where one had died)
              -> starting    a wake failed: its servers restart

A discovered replica (``backends.discovery``) starts in ``joining`` and ends in ``stopped``
after ``leaving``; the health checker is its one writer until it leaves, the discovery after.
"""

from __future__ import annotations

from enum import StrEnum


class BackendState(StrEnum):
    STOPPED = "stopped"
    WAITING = "waiting"  # for its start-up turn on a GPU it shares (spawn mode)
    LOADING = "loading"
    STARTING = "starting"  # model level: its servers are starting (or waking failed)
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


class Level(StrEnum):
    REPLICA = "replica"
    MODEL = "model"


S = BackendState
TRANSITIONS: dict[Level, dict[BackendState, frozenset[BackendState]]] = {
    Level.REPLICA: {
        S.STOPPED: frozenset({S.WAITING, S.LOADING, S.ASLEEP}),
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
    },
    Level.MODEL: {
        S.STOPPED: frozenset({S.STARTING, S.ASLEEP}),
        S.STARTING: frozenset({S.READY}),
        S.READY: frozenset({S.DRAINING}),
        S.DRAINING: frozenset({S.SLEEPING}),
        S.SLEEPING: frozenset({S.ASLEEP}),
        S.ASLEEP: frozenset({S.WAKING}),
        S.WAKING: frozenset({S.READY, S.STARTING}),
    },
}
# Each level's states in the table's order, for metrics.
REPLICA_STATES = tuple(TRANSITIONS[Level.REPLICA])
MODEL_STATES = tuple(TRANSITIONS[Level.MODEL])
# Clients should retry soon.
ON_ITS_WAY = frozenset({S.WAITING, S.LOADING, S.RESTARTING, S.RESTORING, S.JOINING})
# A model on its way out: a replica of it that dies is not restarted.
UNLOADING = frozenset({S.DRAINING, S.SLEEPING, S.ASLEEP, S.STOPPED})


def backoff(failures: int, base: float, cap: float) -> float:
    """Seconds before the next start after ``failures`` failed ones in a row: doubling from
    ``base`` up to ``cap`` (restarts and on-demand starts alike)."""
    return min(cap, base * 2.0 ** max(0, failures - 1))


class InvalidTransition(RuntimeError):
    """A writer asked for a move the table does not allow: a bug in that writer."""


def check(current: BackendState, target: BackendState, level: Level = Level.REPLICA) -> None:
    """Any state may go to ``stopped`` (the gateway stops, or an unload ends the servers)."""
    table = TRANSITIONS[level]
    if target is current or target is S.STOPPED:
        if target in table:
            return
    elif target in table.get(current, frozenset()):
        return
    raise InvalidTransition(f"{level} {current} -> {target} is not a transition")
