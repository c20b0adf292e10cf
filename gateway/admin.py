"""`/admin/*`: what an operator may see of and do to the models (admin keys only).

    GET  /admin/models                 every model: state, since when, last request, last load
                                       time, requests in flight and waiting
    POST /admin/models/{name}/load     start an on-demand model; answers once it is ready
    POST /admin/models/{name}/stop     drain an on-demand model, then stop its servers
    POST /admin/models/{name}/sleep    drain it, then put it to sleep (`?level=1|2`)
    POST /admin/models/{name}/unload   deprecated name of /stop: `on_demand.unload: sleep`
                                       sleeps, while this always stopped, so it was renamed
    POST /admin/models/{name}/wake     wake an asleep model; answers once it is ready
    POST /admin/models/{base}/adapters, DELETE .../adapters/{name}   ``gateway.admin_adapters``

Who may call these is decided before a request gets here (``gateway.auth``). Every action
writes one access-log line: the key's name, the action, the model and how it ended.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel, policy_of
from backends.sleep_mode import LEVELS
from gateway.backend_errors import backend_errors
from gateway.errors import GatewayError, InvalidRequest
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.routing import RouteTable
from gateway.status import model_document
from gateway.telemetry import Telemetry

log = logging.getLogger("vllm_gateway.admin")


def add_admin_routes(api: FastAPI, table: RouteTable, telemetry: Telemetry) -> None:
    @api.get("/admin/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [model_document(p) for p in table.pools]})

    @api.post("/admin/models/{name:path}/load")
    async def load(name: str, request: Request) -> Response:
        model = _on_demand(table, name)
        async with action(telemetry, request, "load", model.name) as outcome:
            with backend_errors():
                await model.ready()
            outcome["result"] = "ready"
        return json_response(model_document(table.resolve(name).pool))

    @api.post("/admin/models/{name:path}/stop")
    async def stop(name: str, request: Request) -> Response:
        return await _stop(table, telemetry, name, request, "stop")

    @api.post("/admin/models/{name:path}/unload")
    async def unload(name: str, request: Request) -> Response:
        log.warning(
            "POST /admin/models/%s/unload is deprecated: it always stops (whatever "
            "`on_demand.unload` says); call POST /admin/models/%s/stop",
            name,
            name,
        )
        return await _stop(table, telemetry, name, request, "unload")

    @api.post("/admin/models/{name:path}/sleep")
    async def sleep(name: str, request: Request, level: int | None = None) -> Response:
        model = _on_demand(table, name)
        if model.config.unload != "sleep":
            raise InvalidRequest(
                f"Model {model.name!r} does not run in sleep mode; set `on_demand.unload: "
                "sleep` in its config."
            )
        if level is not None and level not in LEVELS:
            raise InvalidRequest(f"level must be one of {LEVELS}.", param="level")
        async with action(telemetry, request, "sleep", model.name) as outcome:
            await model.unload("admin sleep", level=level)
            outcome["result"] = str(model.state)
        return json_response(model_document(table.resolve(name).pool))

    @api.post("/admin/models/{name:path}/wake")
    async def wake(name: str, request: Request) -> Response:
        model = _on_demand(table, name)
        if model.state is not BackendState.ASLEEP:
            raise InvalidRequest(f"Model {model.name!r} is not asleep (it is {model.state}).")
        async with action(telemetry, request, "wake", model.name) as outcome:
            with backend_errors():
                await model.ready()
            outcome["result"] = str(model.state)
        return json_response(model_document(table.resolve(name).pool))


async def _stop(
    table: RouteTable, telemetry: Telemetry, name: str, request: Request, called: str
) -> Response:
    model = _on_demand(table, name)
    async with action(telemetry, request, called, model.name) as outcome:
        await model.unload("admin stop", stop=True)  # a stopped model stays so
        outcome["result"] = str(model.state)
    return json_response(model_document(table.resolve(name).pool))


def _on_demand(table: RouteTable, name: str) -> OnDemandModel:
    pool = table.resolve(name).pool  # ModelNotFound (404) for a name it does not know
    model = policy_of(pool)
    if model is None:
        raise InvalidRequest(f"Model {pool.name!r} is always on; only on-demand models load.")
    return model


@contextlib.asynccontextmanager
async def action(
    telemetry: Telemetry, request: Request, action: str, model: str
) -> AsyncIterator[dict[str, str]]:
    """Times one admin action and writes its access-log line, whichever way it ends."""
    key: ApiKey | None = request.scope.get(SCOPE_KEY)
    name = key.name if key else "-"
    outcome = {"result": "cancelled"}
    began = time.perf_counter()
    tracing = telemetry.tracing  # [trace hook: one span per admin action]
    spanned = tracing.admin(action, model, name, request.scope["headers"]) if tracing else None
    with spanned or contextlib.nullcontext() as span:
        try:
            yield outcome
        except GatewayError as exc:
            outcome["result"] = exc.code or "error"
            raise
        finally:
            if span is not None:
                span.set_attribute("vllm_gateway.admin.result", outcome["result"])
            telemetry.admin_action(
                name, action, model, outcome["result"], time.perf_counter() - began
            )


def json_response(document: Any) -> Response:
    """A JSON document, as every endpoint of the control and admin APIs answers."""
    return Response(orjson.dumps(document), media_type="application/json")
