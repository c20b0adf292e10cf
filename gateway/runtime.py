"""The long-lived parts of a running gateway, and how a reload changes them in place.

``create_app`` builds one ``Runtime`` from the config; requests reach it through the relay and
the control API. A reload (``gateway.reload``) never rebuilds it: models are added, removed and
restarted here one at a time, and the rest (keys, limits, CORS, aliases, balancing, health,
on-demand and queue settings) is swapped in for new requests, while requests in flight keep
what they hold (fallbacks and per-model timeouts included: ``gateway.traffic``; a queue's
waiters stay in it). Pools live as long as their model, so in-flight counts and open streams
stay whole.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, field

from starlette.middleware.cors import CORSMiddleware

from backends.discovery import Discovery, DnsName, Resolver
from backends.health import HealthChecker, HealthPolicy
from backends.kv_events import KvEventFeeds
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.on_demand import policy_of
from backends.on_demand_api import OnDemand
from backends.pool import Ejection, Replica, ReplicaPool
from backends.supervisor import Supervisor
from backends.swaps import Switchboard
from backends.vllm_load import LoadScraper
from gateway.access_log import AccessLog
from gateway.auth import AccessMiddleware, access_policy
from gateway.keys import KeyRing
from gateway.model_settings import ModelSettings
from gateway.prompt_prefix import kv_event_endpoints, prefix_router
from gateway.relay import Relay, RelayLimits
from gateway.routing import RouteTable
from gateway.settings import GatewaySettings
from gateway.specs import (
    backend_specs,
    on_demand_config,
    on_demand_model,
    spawn_health,
    swap_policy,
)
from gateway.status import StatusReport
from gateway.telemetry import Telemetry
from gateway.traffic.admission import use_queue
from gateway.traffic.plan import traffic_plan
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream import UpstreamClients

log = logging.getLogger("vllm_gateway.runtime")


class Front:
    """The outermost app: CORS around the error boundary, swapped whole when CORS changes."""

    def __init__(self, inner: ASGIApp, settings: GatewaySettings) -> None:
        self.inner = inner
        self.app = with_cors(inner, settings)

    def use(self, settings: GatewaySettings) -> None:
        self.app = with_cors(self.inner, settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def with_cors(app: ASGIApp, settings: GatewaySettings) -> ASGIApp:
    if settings.cors is None:
        return app
    return CORSMiddleware(
        app,
        allow_origins=settings.cors.allowed_origins,
        allow_methods=settings.cors.allowed_methods,
        allow_headers=settings.cors.allowed_headers,
        allow_credentials=settings.cors.allow_credentials,
    )


@dataclass(eq=False)
class Runtime:
    settings: GatewaySettings
    supervisor: Supervisor
    board: Switchboard
    lives: dict[str, ModelLife]
    pools: list[ReplicaPool]  # one list, shared with the metrics, the status page and the table
    health: HealthChecker
    scraper: LoadScraper
    table: RouteTable
    keys: KeyRing
    clients: UpstreamClients
    telemetry: Telemetry
    relay: Relay
    status: StatusReport
    resolver: Resolver
    hit_rates: LoadScraper  # the prefix-cache hit rates of `balance: prefix` models' replicas
    kv_events: KvEventFeeds  # what their servers hold, fed to their prefix indexes
    discoveries: dict[str, Discovery] = field(default_factory=dict)
    access: AccessMiddleware | None = None  # set once the app around it is built
    front: Front | None = None
    _keys_watcher: asyncio.Task[None] | None = None
    _leaving: set[asyncio.Task[None]] = field(default_factory=set)  # URLs a reload removed

    # What runs beside requests.

    async def start(self) -> None:
        await self.relay.key_limits.start()
        await self.supervisor.start()
        for model in self.board.models.values():  # where the last gateway left them
            if (kept := await self.supervisor.resumed(model.name)) is not None:
                await model.adopted(kept)
        await self.health.start()
        for discovery in self.discoveries.values():
            await discovery.start()
        await self.scraper.start()
        await self.hit_rates.start()
        self.kv_events.start()
        self.board.start()  # pinned models load
        self._keys_watcher = asyncio.create_task(self.keys.watch())

    async def stop(self) -> None:
        if self._keys_watcher is not None:
            self._keys_watcher.cancel()
        for task in self._leaving:
            task.cancel()
        await self.board.close()
        await self.scraper.stop()
        await self.hit_rates.stop()
        await self.kv_events.stop()
        for discovery in self.discoveries.values():
            await discovery.stop()
        await self.health.stop()
        await self.supervisor.stop()
        for life in self.lives.values():
            await life.close()
        await self.clients.aclose()
        await self.relay.key_limits.close()
        self.telemetry.close()
        if (tracing := self.telemetry.tracing) is not None:
            await asyncio.to_thread(tracing.shutdown)  # the last batch, bounded in time

    # What a reload changes.

    async def use(self, new: GatewaySettings, keys: KeyRing) -> None:
        """Everything but the models' servers, for new requests: ``keys`` (the new config's:
        ``key_ring``), access, limits, CORS, the access log, aliases and per-model settings.
        A model the new config adds must have been added first."""
        if self._keys_watcher is not None:
            self._keys_watcher.cancel()
            self._keys_watcher = asyncio.create_task(keys.watch())
        self.keys = keys
        if self.access is not None:
            self.access.keys = keys
            self.access.needs = access_policy(frozenset(new.open_endpoints))
        self.relay.use_limits(relay_limits(new))  # per-model timeouts and fallbacks with them
        self.telemetry.access_log = access_log(new)
        self.telemetry.metrics.requests_by_key = new.metrics.requests_by_key
        if self.front is not None:
            self.front.use(new)
        for model in new.models:
            self._update_model(model, new)
            if model.vllm is None and model.discover is None:
                await self._follow_urls(model)
            await self._follow_kv_events(model)
        self._scrape(new)
        self._route(new)
        self.board.use(*swap_policy(new))
        self.status.swap_groups = self.board.swap_groups()
        self.settings = new

    def _update_model(self, model: ModelSettings, settings: GatewaySettings) -> None:
        pool = self.pool(model.name)
        pool.policy = model.balance
        pool.prefix = prefix_router(model, pool.prefix)
        pool.affinity_header = model.affinity_header.lower().encode("latin-1")
        connected = model.name not in self.supervisor.lives  # a spawned server's key is its own
        for replica in pool.replicas:
            replica.ejection = ejection(model)
            if connected and model.vllm is None:
                replica.api_key = backend_key(model)
        if model.on_demand is not None and (policy := policy_of(pool)) is not None:
            policy.config = on_demand_config(model, settings)
            policy.costs.reseed(policy.config.costs)  # unmeasured phases
            self.board.keep_loaded(policy)  # it may be pinned now
        use_queue(pool, self.lives[model.name], model, settings)
        self.health.reconfigure(self.lives[model.name], health_policy(model))

    async def _follow_urls(self, model: ModelSettings) -> None:
        """A connect-mode model's URLs, as discovery follows DNS: a new one joins (admitted
        once its checks pass), a removed one leaves (its requests end, then it goes)."""
        life, wanted = self.lives[model.name], list(model.endpoints)
        present = {r.url: r for r in life.replicas if r.state is not BackendState.LEAVING}
        for url in (u for u in wanted if u not in present):
            replica = Replica(url, backend_key(model), state=BackendState.JOINING)
            replica.ejection = ejection(model)
            await life.join(replica)
            self.health.watch(life, replica, health_policy(model))
        for url, replica in present.items():
            if url not in wanted:
                self.health.forget(replica)
                await life.move(BackendState.LEAVING, replica)
                task = asyncio.create_task(self._leave(life, replica), name=f"leave:{url}")
                self._leaving.add(task)
                task.add_done_callback(self._leaving.discard)

    async def _follow_kv_events(self, model: ModelSettings) -> None:
        """Its replicas' KV-cache events feed its prefix index as its config now says (none
        for a model no longer balanced by prefix)."""
        pool = self.pool(model.name)
        endpoints = kv_event_endpoints(model, self.supervisor)
        if pool.prefix is None or endpoints is None:
            await self.kv_events.unfollow(model.name)
        else:
            self.kv_events.follow(pool, self.lives[model.name], endpoints)

    def _scrape(self, settings: GatewaySettings) -> None:
        """vLLM's own load for the models balanced by it, and the prefix-cache hit rates of
        those balanced by prefix, as the config now says."""
        policy = {m.name: m.balance for m in settings.models}
        self.scraper.use([p for p in self.pools if policy.get(p.name) == "vllm_metrics"])
        self.hit_rates.use([p for p in self.pools if policy.get(p.name) == "prefix"])

    async def _leave(self, life: ModelLife, replica: Replica) -> None:
        await life.drained([replica])
        await life.remove(replica)
        await self.clients.forget(replica.url)

    def _route(self, settings: GatewaySettings) -> None:
        by_name = {p.name: p for p in self.pools}
        self.table.replace(
            [(by_name[m.name], m.aliases) for m in settings.models],
            {m.name: m.adapter_names for m in settings.models},
        )
        self.status.aliases = {m.name: m.aliases for m in settings.models}
        self.status.modes = {m.name: mode(m) for m in settings.models}
        self.telemetry.models_changed()

    def pool(self, name: str) -> ReplicaPool:
        return next(p for p in self.pools if p.name == name)

    async def add_model(self, model: ModelSettings, settings: GatewaySettings) -> None:
        """A new model: its servers start (unless on demand), and requests reach it once the
        routes are swapped in (``use``)."""
        if model.vllm is not None:
            specs = [s for s in backend_specs(settings) if s.name == model.name]
            health = spawn_health(settings).get(model.name)
            life = await self.supervisor.add(
                specs, on_demand=model.on_demand is not None, health=health
            )
        else:
            life = ModelLife(
                model.name, [Replica(url, backend_key(model)) for url in model.endpoints]
            )
            for replica in life.replicas:
                self.health.watch(life, replica, health_policy(model))
        for replica in life.replicas:
            replica.ejection = ejection(model)
        self.lives[model.name] = life
        pool = new_pool(model, life)
        if model.on_demand is not None:
            pool.on_demand = self.board.add(on_demand_model(model, settings, self.supervisor))
        use_queue(pool, life, model, settings)
        self.pools.append(pool)
        if model.discover is not None:
            discovery = self.discovery(model, life)
            self.discoveries[model.name] = discovery
            await discovery.start()
        await self._follow_kv_events(model)

    async def remove_model(self, name: str, drain_timeout: float) -> None:
        """A model gone from the config: routes dropped first (new requests get 404), then
        its requests in flight end (cut after ``drain_timeout``), then its servers stop."""
        pool, life = self.pool(name), self.lives[name]
        self._route_without(name)
        await self.kv_events.unfollow(name)
        if not await life.drained(timeout=drain_timeout):
            log.warning("%s: cutting %d requests after %gs", name, life.in_flight, drain_timeout)
        if (discovery := self.discoveries.pop(name, None)) is not None:
            await discovery.stop()
        for replica in list(life.replicas):
            self.health.forget(replica)
        if (policy := policy_of(pool)) is not None:
            await self.board.remove(policy)
        if name in self.supervisor.lives:
            await self.supervisor.remove(name)
        else:
            await life.close()
        for replica in life.replicas:
            await self.clients.forget(replica.url)
        self.pools.remove(pool)
        del self.lives[name]
        self._scrape(self.settings)
        self.telemetry.models_changed()

    def _route_without(self, name: str) -> None:
        models = [m for m in self.settings.models if m.name != name]
        self.settings = self.settings.model_copy(update={"models": models})
        self._route(self.settings)

    async def restart_model(self, model: ModelSettings, settings: GatewaySettings) -> None:
        """Its servers start again with their new command, one replica at a time; requests
        wait for a ready replica meanwhile, as for a start."""
        if model.vllm is None or model.name not in self.supervisor.lives:  # a change of mode
            await self.remove_model(model.name, drain_timeout(self.settings, model.name))
            await self.add_model(model, settings)
            self.settings = settings
            self._route(settings)
            return
        pool = self.pool(model.name)
        specs = [s for s in backend_specs(settings) if s.name == model.name]
        pool.hold_for = start_timeout(model)
        pool.max_model_len = None  # its `max-model-len` may change: asked again
        try:
            await self.supervisor.restart(model.name, specs, drain_timeout(settings, model.name))
        finally:
            pool.hold_for = 0.0

    def discovery(self, model: ModelSettings, life: ModelLife) -> Discovery:
        assert model.discover is not None
        return Discovery(
            life,
            DnsName.parse(model.discover.dns),
            model.discover.interval,
            self.health,
            health_policy(model),
            api_key=backend_key(model),
            ejection=ejection(model),
            resolver=self.resolver,
            on_removed=self._forget_replica,
        )

    def _forget_replica(self, replica: Replica) -> Awaitable[None]:
        return self.clients.forget(replica.url)


def new_pool(model: ModelSettings, life: ModelLife) -> ReplicaPool:
    """The model's replica pool: the replicas its life keeps."""
    return ReplicaPool(
        model.name,
        life.replicas,
        policy=model.balance,
        affinity_header=model.affinity_header.lower().encode("latin-1"),
        life=life,
        prefix=prefix_router(model),
    )


def relay_limits(settings: GatewaySettings) -> RelayLimits:
    return RelayLimits(
        max_body_bytes=settings.max_body_bytes,
        first_byte_timeout=settings.timeouts.first_byte,
        idle_timeout=settings.timeouts.idle,
        usage_for_all_streams=settings.stream_usage == "always",
        retry_loading=settings.retry_after.loading,
        retry_no_replica=settings.retry_after.no_replica,
        traffic=traffic_plan(settings),
    )


def access_log(settings: GatewaySettings) -> AccessLog | None:
    """One line per request, unless `access_log` (or, unset, the log level) says none."""
    return AccessLog(settings.log_format) if settings.writes_access_log else None


def mode(model: ModelSettings) -> str:
    return "spawn" if model.vllm is not None else "connect"


def backend_key(model: ModelSettings) -> str | None:
    """The key a connect-mode model's servers expect, if any."""
    return model.api_key.get_secret_value() if model.api_key else None


def ejection(model: ModelSettings) -> Ejection:
    return Ejection(after=model.health.eject_after, seconds=model.health.eject_seconds)


def health_policy(model: ModelSettings) -> HealthPolicy:
    return model.health.policy()


def drain_timeout(settings: GatewaySettings, name: str) -> float:
    """How long a model's requests may run on once it is to stop or restart."""
    model = next((m for m in settings.models if m.name == name), None)
    if model is not None and model.on_demand is not None:
        return model.on_demand.drain_timeout
    return OnDemand().drain_timeout


def start_timeout(model: ModelSettings) -> float:
    """How long a request waits for a restarting model, as for an on-demand start."""
    return (model.on_demand or OnDemand()).start_timeout
