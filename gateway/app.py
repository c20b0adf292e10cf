"""The application factory: settings in, one ASGI app out. No globals, no work at import.

Layers, outermost first: CORS (when configured), the error boundary (an unexpected exception
anywhere below is logged once and answered 500: ``gateway.boundary``; inside CORS, so a
browser can read that answer too), access (API keys, and who may read the ops surfaces:
``gateway.auth``), then a dispatcher that sends the relayed paths straight to the
pure-ASGI relay and everything else (health, the model list, metrics, status, errors for
unknown paths) to the control API. The dispatcher, the app itself, runs the lifespan: it starts
and stops the supervisor, health checks, load scrapes and the keys watcher.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from backends.discovery import Resolver, resolve
from backends.health import HealthChecker, HealthPolicy
from backends.kv_events import KvEventFeeds
from backends.life import ModelLife
from backends.pool import Replica
from backends.state_dir import StateDir
from backends.supervisor import Supervisor
from backends.vllm_load import LoadScraper
from gateway.auth import AccessMiddleware, access_policy
from gateway.boundary import ErrorBoundary
from gateway.catalog import ModelCatalog
from gateway.control import ControlParts, control_api
from gateway.dispatch import Dispatcher
from gateway.keys import key_ring
from gateway.limits.build import limits_store
from gateway.limits.store import LimitsStore
from gateway.prompt_prefix import kv_event_endpoints
from gateway.relay import Relay
from gateway.reload import ReloadCollector, Reloader
from gateway.routing import RouteTable
from gateway.runtime import (
    Front,
    Runtime,
    access_log,
    backend_key,
    ejection,
    health_policy,
    mode,
    new_pool,
    relay_limits,
)
from gateway.settings import GatewaySettings, state_path
from gateway.specs import (
    backend_specs,
    gpu_memory,
    on_demand_names,
    spawn_health,
    switchboard,
)
from gateway.status import StatusReport
from gateway.telemetry import Telemetry
from gateway.tracing import Tracing
from gateway.traffic.admission import use_queue
from gateway.types import ASGIApp
from gateway.upstream import UpstreamClients, Upstreams


def create_app(
    settings: GatewaySettings,
    *,
    supervisor: Supervisor | None = None,
    resolver: Resolver = resolve,
    config_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    beside: Beside | None = None,
    upstreams: Upstreams | None = None,
    key_limits: LimitsStore | None = None,
) -> ASGIApp:
    """Build the gateway. Spawn-mode models are started by ``supervisor`` during the lifespan;
    ``resolver`` answers the DNS names of models with `discover`; ``config_path``: the file a
    reload reads again (with the command line's ``overrides`` over it); ``beside``: what else
    runs while the gateway does, once its parts have started (a control plane's workers:
    ``gateway.workers``); ``upstreams``: what the relay sends requests through (tests:
    backends in-process, ``gateway.inprocess``); ``key_limits``: where per-key limits are
    counted (default: ``gateway.limits.build.limits_store``)."""
    runtime = build_runtime(settings, supervisor, resolver, upstreams, key_limits)
    reloader = Reloader(runtime, config_path, overrides)
    runtime.telemetry.metrics.registry.register(ReloadCollector(reloader))
    runtime.status.reload = reloader.document

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await runtime.start()
        reloader.start()
        reload_on_sighup(reloader)
        try:
            if beside is None:
                yield
            else:
                async with beside(runtime, reloader):
                    yield
        finally:
            await reloader.stop()
            await runtime.stop()

    parts = ControlParts(
        ModelCatalog(runtime.table, runtime.clients),
        runtime.telemetry,
        runtime.status,
        runtime.clients,
        runtime.supervisor.adapters,
        reloader,
    )
    app: ASGIApp = Dispatcher(runtime.relay, control_api(parts), lifespan)
    needs = access_policy(frozenset(settings.open_endpoints))
    runtime.access = AccessMiddleware(
        app, runtime.keys, needs, on_refused=runtime.telemetry.refused
    )
    runtime.front = Front(ErrorBoundary(runtime.access), settings)
    return runtime.front


Beside = Callable[[Runtime, Reloader], AbstractAsyncContextManager[None]]


def build_runtime(
    settings: GatewaySettings,
    supervisor: Supervisor | None,
    resolver: Resolver,
    upstreams: Upstreams | None = None,
    key_limits: LimitsStore | None = None,
) -> Runtime:
    connect = settings.timeouts.connect
    if supervisor is None:
        supervisor = Supervisor(
            backend_specs(settings),
            log_dir=settings.log_dir,
            gpu_memory=gpu_memory(settings),
            health=spawn_health(settings),
            on_demand=on_demand_names(settings),
            connect_timeout=connect,
            state_dir=StateDir(state_path(settings)),
            keep_backends=settings.keep_backends,
        )
    board = switchboard(settings, supervisor)
    lives, checked = _lives(settings, supervisor)
    pools = [new_pool(model, lives[model.name]) for model in settings.models]
    for pool, model in zip(pools, settings.models, strict=True):
        pool.on_demand = board.models.get(pool.name)
        use_queue(pool, lives[model.name], model, settings)
    # Runtime LoRA adapters are restored in both modes.
    health_checker = HealthChecker(checked, supervisor.adapters, connect_timeout=connect)
    scraper = LoadScraper(
        [pool for pool in pools if pool.policy == "vllm_metrics"], connect_timeout=connect
    )
    # For the status page's prefix-cache hit rates only: no choice waits on them.
    prefixed = [pool for pool in pools if pool.policy == "prefix"]
    hit_rates = LoadScraper(prefixed, interval=5.0, connect_timeout=connect)
    table = RouteTable(
        [(p, m.aliases) for p, m in zip(pools, settings.models, strict=True)],
        {m.name: m.adapter_names for m in settings.models},
    )
    clients = UpstreamClients(connect_timeout=connect)
    tracing = Tracing(settings.tracing) if settings.tracing is not None else None
    board.tracer = tracing.tracer if tracing is not None else None  # swaps are spans too
    by_key = settings.metrics.requests_by_key
    telemetry = Telemetry(pools, access_log(settings), tracing, requests_by_key=by_key)
    if key_limits is None:
        key_limits = limits_store(settings.limits_store, os.environ)
    if (limits_series := key_limits.collector()) is not None:
        telemetry.metrics.registry.register(limits_series)
    limits = relay_limits(settings)
    relay = Relay(table, upstreams or clients, limits, telemetry, key_limits)
    status = StatusReport(
        pools,
        aliases={m.name: m.aliases for m in settings.models},
        modes={m.name: mode(m) for m in settings.models},
        telemetry=telemetry,
        swap_groups=board.swap_groups(),
    )
    runtime = Runtime(
        settings,
        supervisor,
        board,
        lives,
        pools,
        health_checker,
        scraper,
        table,
        key_ring(settings),
        clients,
        telemetry,
        relay,
        status,
        resolver,
        hit_rates,
        KvEventFeeds(),
    )
    for model, pool in zip(settings.models, pools, strict=True):
        if pool.prefix is not None and (endpoints := kv_event_endpoints(model, supervisor)):
            runtime.kv_events.follow(pool, lives[model.name], endpoints)
    for model in settings.models:
        if model.discover is not None:
            runtime.discoveries[model.name] = runtime.discovery(model, lives[model.name])
    return runtime


def _lives(
    settings: GatewaySettings, supervisor: Supervisor
) -> tuple[dict[str, ModelLife], list[tuple[ModelLife, Replica, HealthPolicy]]]:
    """Each model's life (the one writer of its states), and the replicas the gateway
    health-checks itself: those it connects to; the supervisor watches the ones it spawns."""
    lives = {}
    checked: list[tuple[ModelLife, Replica, HealthPolicy]] = []
    for model in settings.models:
        if model.vllm is None:
            key = backend_key(model)
            life = ModelLife(model.name, [Replica(url=url, api_key=key) for url in model.endpoints])
            checked += [(life, replica, health_policy(model)) for replica in life.replicas]
        else:
            life = supervisor.life(model.name)
        for replica in life.replicas:
            replica.ejection = ejection(model)
        lives[model.name] = life
    return lives, checked


def reload_on_sighup(reloader: Reloader) -> None:
    """`kill -HUP` reloads the config (the keys file with it). Only the main thread may install
    signal handlers."""
    if threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reloader.reload_soon, "SIGHUP")
