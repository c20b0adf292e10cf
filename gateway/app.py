"""The application factory: settings in, one ASGI app out. No globals, no work at import.

Layers, outermost first: CORS (when configured), API keys (when configured), then a dispatcher
that sends the relayed paths straight to the pure-ASGI relay and everything else (health, the
model list, errors for unknown paths) to a small FastAPI app that owns the lifespan.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from backends.pool import Replica, ReplicaPool
from backends.supervisor import Supervisor
from gateway.auth import OPEN_PATHS, APIKeyMiddleware
from gateway.catalog import ModelCatalog
from gateway.errors import GatewayError, InvalidRequest, MethodNotAllowed, RouteNotFound
from gateway.keys import SCOPE_KEY, ApiKey, KeyRing, key_ring
from gateway.launch import backend_specs
from gateway.relay import Relay, RelayLimits
from gateway.routing import RELAYED_PATHS, RouteTable
from gateway.settings import GatewaySettings
from gateway.types import ASGIApp, Receive, Scope, Send
from gateway.upstream import UpstreamClients


def create_app(settings: GatewaySettings, *, supervisor: Supervisor | None = None) -> ASGIApp:
    """Build the gateway. Spawn-mode models are started by ``supervisor`` during the lifespan."""
    if supervisor is None:
        supervisor = Supervisor(backend_specs(settings), log_dir=settings.log_dir)
    pools = []
    for model in settings.models:
        if model.url is not None:
            key = model.api_key.get_secret_value() if model.api_key else None
            replicas = [Replica(url=model.url, api_key=key)]
        else:
            replicas = supervisor.replicas(model.name)
        pools.append((ReplicaPool(model.name, replicas), model.aliases))
    table = RouteTable(pools)
    keys = key_ring(settings)
    clients = UpstreamClients(connect_timeout=settings.timeouts.connect)
    relay = Relay(
        table,
        clients,
        RelayLimits(
            max_body_bytes=settings.max_body_bytes,
            first_byte_timeout=settings.timeouts.first_byte,
            idle_timeout=settings.timeouts.idle,
            client_timeout=settings.timeouts.client,
        ),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await supervisor.start()
        watcher = asyncio.create_task(keys.watch())
        reload_on_sighup(keys)
        try:
            yield
        finally:
            watcher.cancel()
            await supervisor.stop()
            await clients.aclose()

    api = _control_api(ModelCatalog(table, clients), lifespan)
    app: ASGIApp = Dispatcher(relay, api)
    if keys.enabled:
        opened = {path for name in settings.open_endpoints for path in OPENABLE[name]}
        app = APIKeyMiddleware(app, keys, OPEN_PATHS | opened)
    if settings.cors is not None:
        app = CORSMiddleware(
            app,
            allow_origins=settings.cors.allowed_origins,
            allow_methods=settings.cors.allowed_methods,
            allow_headers=settings.cors.allowed_headers,
            allow_credentials=settings.cors.allow_credentials,
        )
    return app


# Paths a config may serve without a key (`open_endpoints`).
OPENABLE = {"metrics": {"/metrics"}, "status": {"/status", "/status.json"}}


def reload_on_sighup(keys: KeyRing) -> None:
    """`kill -HUP` re-reads the keys file. Only the main thread may install signal handlers."""
    if threading.current_thread() is threading.main_thread():
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, keys.reload)


class Dispatcher:
    """Relayed paths go to the relay without FastAPI's routing; the rest to the control API."""

    def __init__(self, relay: Relay, api: FastAPI) -> None:
        self.relay = relay
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in RELAYED_PATHS:
            await self.relay(scope, receive, send)
        else:
            await self.api(scope, receive, send)


def _control_api(catalog: ModelCatalog, lifespan: Any) -> FastAPI:
    api = FastAPI(
        title="vllm-gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )

    @api.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        key: ApiKey | None = request.scope.get(SCOPE_KEY)
        listing = await catalog.listing(key.models if key is not None else None)
        return Response(orjson.dumps(listing), media_type="application/json")

    @api.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> Response:
        return _error_response(exc)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return _error_response(MethodNotAllowed(f"{request.method} is not allowed here."))
        if exc.status_code == 404:
            return _error_response(RouteNotFound(f"No route {request.url.path!r} on this gateway."))
        return _error_response(InvalidRequest(str(exc.detail)))

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> Response:
        return _error_response(InvalidRequest(f"Invalid request: {exc.errors()}"))

    return api


def _error_response(error: GatewayError) -> Response:
    headers = {k.decode(): v.decode() for k, v in error.headers()}
    return Response(error.body(), status_code=error.status, headers=headers)
