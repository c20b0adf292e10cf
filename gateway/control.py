"""The gateway's own endpoints: health, the model list, metrics, the status page, and the admin
API (``gateway.admin``).

Who may call which is decided before a request gets here (``gateway.auth``).

A small FastAPI app behind the dispatcher; the relayed paths never reach it. Its errors use the
same OpenAI shape as the relay's, and prometheus-fastapi-instrumentator counts its requests
(the relayed ones are counted by ``gateway.metrics``, with model and key labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_fastapi_instrumentator import Instrumentator
from starlette.exceptions import HTTPException
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.types import ASGIApp

from backends.adapters import AdapterBook
from gateway import waits
from gateway.admin import add_admin_routes, json_response
from gateway.admin_adapters import add_adapter_routes
from gateway.admin_reload import add_reload_route
from gateway.catalog import ModelCatalog
from gateway.errors import (
    BackendUnavailable,
    GatewayError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    RouteNotFound,
)
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.reload import Reloader
from gateway.request import read_head
from gateway.status import StatusReport
from gateway.telemetry import Telemetry
from gateway.upstream import UpstreamClients, upstream_errors


@dataclass(frozen=True)
class ControlParts:
    catalog: ModelCatalog
    telemetry: Telemetry
    status: StatusReport
    clients: UpstreamClients
    adapters: AdapterBook
    reloader: Reloader


class ControlApi(FastAPI):
    """FastAPI without its outermost ``ServerErrorMiddleware``, which answers an unexpected
    exception in plain text and re-raises it for the server to log: the gateway's boundary
    (``gateway.boundary``) answers it in OpenAI's shape and logs it, once."""

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if isinstance(stack, ServerErrorMiddleware):
            return stack.app
        raise TypeError(f"FastAPI's outermost middleware is {type(stack).__name__} now")


def control_api(parts: ControlParts) -> FastAPI:
    api = ControlApi(title="vllm-gateway", docs_url=None, redoc_url=None, openapi_url=None)
    registry = parts.telemetry.metrics.registry
    Instrumentator(excluded_handlers=["/metrics"], registry=registry).instrument(api)
    page = resources.files("gateway").joinpath("status.html").read_bytes()

    @api.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @api.get("/v1/models")
    async def models(request: Request) -> Response:
        key: ApiKey | None = request.scope.get(SCOPE_KEY)
        listing = await parts.catalog.listing(key.models if key is not None else None)
        return json_response(listing)

    @api.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> Response:
        key: ApiKey | None = request.scope.get(SCOPE_KEY)
        card = await parts.catalog.card(name, key.models if key is not None else None)
        return json_response(card)

    @api.get("/metrics")
    async def metrics() -> Response:
        await parts.telemetry.gathered()
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @api.get("/backends/{model}/metrics")
    async def backend_metrics(model: str, replica: str = "0") -> Response:
        """A backend's own `vllm:*` series, relayed (vLLM serves /metrics without a key)."""
        return await _backend_metrics(parts, model, replica)

    @api.get("/status")
    async def status_page() -> Response:
        return HTMLResponse(page)

    @api.get("/status.json")
    async def status_json() -> Response:
        await parts.telemetry.gathered()
        return json_response(parts.status.document())

    add_admin_routes(api, parts.catalog.table, parts.telemetry)
    add_adapter_routes(
        api, parts.catalog.table, parts.telemetry, parts.adapters, parts.clients.connect_timeout
    )
    add_reload_route(api, parts.reloader)

    @api.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc, request)

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 405:
            return error_response(
                MethodNotAllowed(f"{request.method} is not allowed here."), request
            )
        if exc.status_code == 404:
            return error_response(
                RouteNotFound(f"No route {request.url.path!r} on this gateway."), request
            )
        return error_response(InvalidRequest(str(exc.detail)), request)

    @api.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(InvalidRequest(f"Invalid request: {exc.errors()}"), request)

    return api


async def _backend_metrics(parts: ControlParts, model: str, name: str) -> Response:
    """``name``: the replica as metrics label it, its index or a discovered pod's address."""
    pool = next((p for p in parts.catalog.table.pools if p.name == model), None)
    if pool is None:
        raise ModelNotFound(f"No model {model!r} on this gateway.", param="model")
    named = dict(pool.labelled())
    replica = named.get(name)
    if replica is None:
        raise InvalidRequest(
            f"Model {model!r} has no replica {name!r}; it has {', '.join(named) or 'none'}.",
            param="replica",
        )
    if not replica.url:
        raise BackendUnavailable(
            f"Replica {name} of model {model!r} does not answer.",
            retry_after=waits.RETRY_UNREACHABLE,
        )
    with upstream_errors(model):
        status, content_type, body = await parts.clients.get(
            replica.url, replica.uds, "/metrics", [], waits.BACKEND_METRICS
        )
    return Response(body, status_code=status, media_type=content_type or CONTENT_TYPE_LATEST)


def error_response(error: GatewayError, request: Request) -> Response:
    """The control API's errors, with the same body and headers as ``send_error`` writes."""
    request_id = read_head(request.scope["headers"]).request_id
    headers = {k.decode(): v.decode() for k, v in error.headers(request_id)}
    return Response(error.body(), status_code=error.status, headers=headers)
