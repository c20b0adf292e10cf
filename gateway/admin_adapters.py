"""`/admin/models/{base}/adapters`: LoRA adapters loaded and unloaded while the model runs.

    POST   /admin/models/{base}/adapters          {"name": ..., "path": ...}
    DELETE /admin/models/{base}/adapters/{name}

A load goes to every ready replica of the base model and answers 200 only once all of them
hold the adapter; if some fail, the adapter is unloaded again where it loaded, and the answer
names the replicas that failed and why (502), or passes on vLLM's own refusal when every
replica refused alike (a path with no adapter: 404). The adapter is then remembered
(``backends.adapters.AdapterBook``): a replica that restarts or comes back gets it before it is
admitted.
"""

from __future__ import annotations

import asyncio
from typing import Any, TypeGuard

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from backends import adapters
from backends.adapters import AdapterBook
from backends.errors import AdapterError
from backends.http import client_for
from backends.lifecycle import BackendState
from backends.pool import Replica, ReplicaPool
from gateway import waits
from gateway.admin import action, json_response
from gateway.backend_errors import adapter_failure
from gateway.errors import BackendUnavailable, Conflict, InvalidRequest, ModelNotFound
from gateway.routing import RouteTable
from gateway.telemetry import Telemetry

CALL_TIMEOUT = httpx.Timeout(adapters.CALL_TIMEOUT)  # unless the config's connect timeout


def add_adapter_routes(
    api: FastAPI,
    table: RouteTable,
    telemetry: Telemetry,
    book: AdapterBook,
    connect_timeout: float = adapters.CALL_TIMEOUT,
) -> None:
    """``connect_timeout``: seconds to open a connection to a replica (`timeouts.connect`)."""
    timeout = httpx.Timeout(adapters.CALL_TIMEOUT, connect=connect_timeout)

    @api.post("/admin/models/{base}/adapters")
    async def load(base: str, request: Request) -> Response:
        pool = _base(table, base)
        name, path = _load_request(await request.body())
        if name in table.names:
            raise Conflict(f"{name!r} is already a model or adapter name on this gateway.")
        replicas = [r for r in pool.replicas if r.state is BackendState.READY]
        if not replicas:
            raise BackendUnavailable(
                f"No replica of {pool.name!r} is ready.", retry_after=waits.RETRY_LOADING
            )
        async with action(telemetry, request, "load_adapter", f"{pool.name}/{name}") as outcome:
            await _load_everywhere(replicas, name, path, timeout)
            book.add(pool.name, name, path)
            outcome["result"] = "loaded"
        return json_response(
            {"name": name, "parent": pool.name, "path": path, "replicas": len(replicas)}
        )

    @api.delete("/admin/models/{base}/adapters/{name}")
    async def unload(base: str, name: str, request: Request) -> Response:
        pool = _base(table, base)
        holders = [r for r in pool.replicas if name in r.adapters]
        if not holders and name not in book.of(pool.name):
            raise ModelNotFound(f"Model {pool.name!r} has no adapter {name!r}.", param="name")
        async with action(telemetry, request, "unload_adapter", f"{pool.name}/{name}") as outcome:
            book.remove(pool.name, name)  # first: a replica restarting now must not get it back
            results = await asyncio.gather(
                *(_on(r, timeout, adapters.unload, name) for r in holders),
                return_exceptions=True,
            )
            if bugs := [r for r in results if _unexpected(r)]:
                raise bugs[0]  # not a refusal: the boundary shows it
            failed = [r for r in results if isinstance(r, AdapterError)]
            if failed:
                raise adapter_failure("unloading", name, failed, alike=False)
            outcome["result"] = "unloaded"
        return json_response({"name": name, "parent": pool.name, "replicas": len(holders)})


async def _on(replica: Replica, timeout: httpx.Timeout, call: Any, *args: str) -> None:
    """One adapter call on one replica, through a client that reaches it (TCP or its socket)."""
    async with client_for(replica, timeout) as client:
        await call(client, replica, *args)


async def _load_everywhere(
    replicas: list[Replica], name: str, path: str, timeout: httpx.Timeout = CALL_TIMEOUT
) -> None:
    results = await asyncio.gather(
        *(_on(r, timeout, adapters.load, name, path) for r in replicas), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if not failed:
        return
    loaded = [rep for rep, res in zip(replicas, results, strict=True) if res is None]
    await asyncio.gather(
        *(_on(r, timeout, adapters.unload, name) for r in loaded), return_exceptions=True
    )
    if bugs := [r for r in results if _unexpected(r)]:
        raise bugs[0]  # not a refusal: the boundary shows it
    errors = [e for e in failed if isinstance(e, AdapterError)]
    alike = not loaded and len({(e.status, e.message) for e in errors}) == 1
    raise adapter_failure("loading", name, errors, alike)


def _unexpected(result: object) -> TypeGuard[BaseException]:
    """An exception an adapter call raised that is not a server's refusal: a bug."""
    return isinstance(result, BaseException) and not isinstance(result, AdapterError)


def _base(table: RouteTable, name: str) -> ReplicaPool:
    route = table.resolve(name)  # ModelNotFound (404) for a name it does not know
    if route.adapter is not None:
        raise InvalidRequest(f"{name!r} is an adapter; give its base model {route.pool.name!r}.")
    return route.pool


def _load_request(body: bytes) -> tuple[str, str]:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest('The body must be JSON: {"name": ..., "path": ...}.') from None
    name, path = (doc.get("name"), doc.get("path")) if isinstance(doc, dict) else (None, None)
    if not isinstance(name, str) or not name or len(name) > 200:
        raise InvalidRequest("`name` must be a non-empty string.", param="name")
    if not isinstance(path, str) or not path:
        raise InvalidRequest("`path` must be a non-empty string.", param="path")
    return name, path
