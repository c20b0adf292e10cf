"""`/admin/*`: what an operator may see of and do to the models (admin keys only).

    GET  /admin/models                 every model: state, since when, last request, last load
                                       time, requests in flight and waiting
    POST /admin/models/{name}/load     start an on-demand model; answers once it is ready
    POST /admin/models/{name}/unload   drain an on-demand model, then stop it
    POST /admin/models/{name}/sleep    drain it, then put it to sleep (`?level=1|2`)
    POST /admin/models/{name}/wake     wake an asleep model; answers once it is ready
    POST /admin/models/{base}/adapters, DELETE .../adapters/{name}   ``gateway.admin_adapters``

Who may call these is decided before a request gets here (``gateway.auth``). Every action
writes one access-log line: the key's name, the action, the model and how it ended.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from backends.on_demand import ModelState, OnDemandModel, Unavailable
from backends.sleep_mode import LEVELS
from gateway.errors import GatewayError, InvalidRequest, ModelNotStarted
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.routing import RouteTable
from gateway.status import model_document
from gateway.telemetry import Telemetry


def add_admin_routes(api: FastAPI, table: RouteTable, telemetry: Telemetry) -> None:
    @api.get("/admin/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [model_document(p) for p in table.pools]})

    @api.post("/admin/models/{name:path}/load")
    async def load(name: str, request: Request) -> Response:
        model = _on_demand(table, name)
        async with action(telemetry, request, "load", model.name) as outcome:
            try:
                await model.ready()
            except Unavailable as exc:
                raise ModelNotStarted.because(exc) from None
            outcome["result"] = "ready"
        return json_response(model_document(table.resolve(name).pool))

    @api.post("/admin/models/{name:path}/unload")
    async def unload(name: str, request: Request) -> Response:
        model = _on_demand(table, name)
        async with action(telemetry, request, "unload", model.name) as outcome:
            if model.state is not ModelState.STOPPED:
                await model.unload("admin unload", stop=True)
            outcome["result"] = str(model.state)
        return json_response(model_document(table.resolve(name).pool))

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
        if model.state is not ModelState.ASLEEP:
            raise InvalidRequest(f"Model {model.name!r} is not asleep (it is {model.state}).")
        async with action(telemetry, request, "wake", model.name) as outcome:
            try:
                await model.ready()
            except Unavailable as exc:
                raise ModelNotStarted.because(exc) from None
            outcome["result"] = str(model.state)
        return json_response(model_document(table.resolve(name).pool))


def _on_demand(table: RouteTable, name: str) -> OnDemandModel:
    pool = table.resolve(name).pool  # ModelNotFound (404) for a name it does not know
    if pool.on_demand is None:
        raise InvalidRequest(f"Model {pool.name!r} is always on; only on-demand models load.")
    return pool.on_demand


@contextlib.asynccontextmanager
async def action(
    telemetry: Telemetry, request: Request, action: str, model: str
) -> AsyncIterator[dict[str, str]]:
    """Times one admin action and writes its access-log line, whichever way it ends."""
    key: ApiKey | None = request.scope.get(SCOPE_KEY)
    outcome = {"result": "cancelled"}
    began = time.perf_counter()
    try:
        yield outcome
    except GatewayError as exc:
        outcome["result"] = exc.code or "error"
        raise
    finally:
        telemetry.admin_action(
            key.name if key else "-", action, model, outcome["result"], time.perf_counter() - began
        )


def json_response(document: Any) -> Response:
    """A JSON document, as every endpoint of the control and admin APIs answers."""
    return Response(orjson.dumps(document), media_type="application/json")
