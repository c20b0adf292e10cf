"""The application factory: settings in, one ASGI app out. No globals, no work at import.

Layers, outermost first: CORS (when configured), access (API keys, and who may read the ops
surfaces: ``gateway.auth``), then a dispatcher that sends the relayed paths straight to the
pure-ASGI relay and everything else (health, the model list, metrics, status, errors for
unknown paths) to the control API. The dispatcher, the app itself, runs the lifespan: it starts
and stops the supervisor, health checks, load scrapes and the keys watcher.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from backends.discovery import Discovery, DnsName, Resolver, resolve
from backends.health import HealthChecker, HealthPolicy
from backends.pool import Ejection, Replica, ReplicaPool
from backends.supervisor import Supervisor
from backends.vllm_load import LoadScraper
from gateway.access_log import AccessLog
from gateway.auth import AccessMiddleware, access_policy
from gateway.catalog import ModelCatalog
from gateway.control import ControlParts, control_api
from gateway.keys import KeyRing, key_ring
from gateway.model_settings import ModelSettings
from gateway.relay import Relay, RelayLimits
from gateway.routing import RELAYED_PATHS, RouteTable
from gateway.settings import GatewaySettings
from gateway.specs import (
    backend_specs,
    gpu_memory,
    on_demand_names,
    spawn_health,
    switchboard,
)
from gateway.status import StatusReport
from gateway.telemetry import Telemetry
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream import UpstreamClients


def create_app(
    settings: GatewaySettings,
    *,
    supervisor: Supervisor | None = None,
    resolver: Resolver = resolve,
) -> ASGIApp:
    """Build the gateway. Spawn-mode models are started by ``supervisor`` during the lifespan;
    ``resolver`` answers the DNS names of models with `discover`."""
    if supervisor is None:
        supervisor = Supervisor(
            backend_specs(settings),
            log_dir=settings.log_dir,
            gpu_memory=gpu_memory(settings),
            health=spawn_health(settings),
            on_demand=on_demand_names(settings),
        )
    adapter_book = supervisor.adapters  # runtime LoRA adapters, for both modes
    board = switchboard(settings, supervisor)
    pools, checked = _pools(settings, supervisor)
    for pool, _ in pools:
        pool.on_demand = board.models.get(pool.name)
    health_checker = HealthChecker(checked, adapter_book)
    scraper = LoadScraper([pool for pool, _ in pools if pool.policy == "vllm_metrics"])
    table = RouteTable(pools, {m.name: m.adapter_names for m in settings.models})
    keys = key_ring(settings)
    clients = UpstreamClients(connect_timeout=settings.timeouts.connect)
    discoveries = _discoveries(settings, [p for p, _ in pools], health_checker, resolver, clients)
    telemetry = Telemetry(table.pools, access_log(settings))
    relay = Relay(
        table,
        clients,
        RelayLimits(
            max_body_bytes=settings.max_body_bytes,
            first_byte_timeout=settings.timeouts.first_byte,
            idle_timeout=settings.timeouts.idle,
            usage_for_all_streams=settings.stream_usage == "always",
            retry_loading=settings.retry_after.loading,
            retry_no_replica=settings.retry_after.no_replica,
        ),
        telemetry,
    )
    status = StatusReport(
        table.pools,
        aliases={m.name: m.aliases for m in settings.models},
        modes={m.name: "spawn" if m.vllm is not None else "connect" for m in settings.models},
        telemetry=telemetry,
        swap_groups=board.swap_groups(),
    )

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await supervisor.start()
        await health_checker.start()
        for discovery in discoveries:
            await discovery.start()
        await scraper.start()
        watcher = asyncio.create_task(keys.watch())
        reload_on_sighup(keys)
        try:
            yield
        finally:
            watcher.cancel()
            await board.close()
            await scraper.stop()
            for discovery in discoveries:
                await discovery.stop()
            await health_checker.stop()
            await supervisor.stop()
            await clients.aclose()
            telemetry.close()

    api = control_api(
        ControlParts(ModelCatalog(table, clients), telemetry, status, clients, adapter_book)
    )
    app: ASGIApp = Dispatcher(relay, api, lifespan)
    needs = access_policy(frozenset(settings.open_endpoints))
    app = AccessMiddleware(app, keys, needs, on_refused=telemetry.refused)
    if settings.cors is not None:
        app = CORSMiddleware(
            app,
            allow_origins=settings.cors.allowed_origins,
            allow_methods=settings.cors.allowed_methods,
            allow_headers=settings.cors.allowed_headers,
            allow_credentials=settings.cors.allow_credentials,
        )
    return app


def _pools(
    settings: GatewaySettings, supervisor: Supervisor
) -> tuple[list[tuple[ReplicaPool, list[str]]], list[tuple[str, Replica, HealthPolicy]]]:
    """Each model's replica pool (with its aliases), and the replicas the gateway health-checks
    itself: those it connects to; the supervisor watches the ones it spawns."""
    pools = []
    checked: list[tuple[str, Replica, HealthPolicy]] = []
    for model in settings.models:
        if model.vllm is None:
            key = _backend_key(model)
            replicas = [Replica(url=url, api_key=key) for url in model.endpoints]
            checked += [(model.name, replica, _health_policy(model)) for replica in replicas]
        else:
            replicas = supervisor.replicas(model.name)
        for replica in replicas:
            replica.ejection = _ejection(model)
        pool = ReplicaPool(
            model.name,
            replicas,
            policy=model.balance,
            affinity_header=model.affinity_header.lower().encode("latin-1"),
        )
        pools.append((pool, model.aliases))
    return pools, checked


def _discoveries(
    settings: GatewaySettings,
    pools: list[ReplicaPool],
    health_checker: HealthChecker,
    resolver: Resolver,
    clients: UpstreamClients,
) -> list[Discovery]:
    """One per model with `discover`: it fills the model's (empty) pool from DNS."""
    found = []
    for model, pool in zip(settings.models, pools, strict=True):
        if model.discover is None:
            continue
        found.append(
            Discovery(
                pool,
                DnsName.parse(model.discover.dns),
                model.discover.interval,
                health_checker,
                _health_policy(model),
                api_key=_backend_key(model),
                ejection=_ejection(model),
                resolver=resolver,
                on_removed=lambda replica: clients.forget(replica.url),
            )
        )
    return found


def _backend_key(model: ModelSettings) -> str | None:
    """The key a connect-mode model's servers expect, if any."""
    return model.api_key.get_secret_value() if model.api_key else None


def _ejection(model: ModelSettings) -> Ejection:
    return Ejection(after=model.health.eject_after, seconds=model.health.eject_seconds)


def _health_policy(model: ModelSettings) -> HealthPolicy:
    health = model.health
    return HealthPolicy(
        health.interval, health.timeout, health.unhealthy_threshold, health.healthy_threshold
    )


def access_log(settings: GatewaySettings) -> AccessLog | None:
    """One line per request when `access_log` is on and the log level shows info lines."""
    if settings.access_log and settings.log_level in ("info", "debug"):
        return AccessLog(settings.log_format)
    return None


def reload_on_sighup(keys: KeyRing) -> None:
    """`kill -HUP` re-reads the keys file. Only the main thread may install signal handlers."""
    if threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keys.reload_soon)


class Dispatcher:
    """Relayed paths go to the relay without FastAPI's routing; the rest to the control API.
    The lifespan is the dispatcher's own: the outermost app owns what runs beside requests."""

    def __init__(
        self,
        relay: Relay,
        api: FastAPI,
        lifespan: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        self.relay = relay
        self.api = api
        self.lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in RELAYED_PATHS:
            await self.relay(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI's lifespan protocol around ``self.lifespan``: startup, then shutdown."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException:
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})
