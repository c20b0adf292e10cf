"""LoRA adapters loaded at runtime, and how a server is given them.

vLLM serves adapters on top of a base model: listed in its `/v1/models` with the base as
`parent`, chosen by a request's `model`. Adapters named in the config are served from the
start (`--lora-modules`); others are loaded while the server runs (`VLLM_ALLOW_RUNTIME_LORA_
UPDATING=True`):

    POST /v1/load_lora_adapter   {"lora_name": ..., "lora_path": ...}   200; again: 400
    POST /v1/unload_lora_adapter {"lora_name": ...}                     200; unknown: 404

The ``AdapterBook`` remembers the runtime adapters of each base model in the gateway process,
so a server that restarts (or a replica that comes back) is given them again before it is
admitted; they are gone when the gateway restarts, unless the config lists them.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from backends.errors import AdapterError
from backends.pool import Replica

log = logging.getLogger("vllm_gateway.adapters")
RUNTIME_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
CALL_TIMEOUT = 120.0  # seconds: a large adapter is read from disk and moved to the GPU


class AdapterBook:
    """Base model -> {adapter name: path} of the adapters loaded at runtime."""

    def __init__(self) -> None:
        self.runtime: dict[str, dict[str, str]] = {}

    def of(self, base: str) -> dict[str, str]:
        return dict(self.runtime.get(base, {}))

    def add(self, base: str, name: str, path: str) -> None:
        self.runtime.setdefault(base, {})[name] = path

    def remove(self, base: str, name: str) -> None:
        self.runtime.get(base, {}).pop(name, None)


async def load(client: httpx.AsyncClient, replica: Replica, name: str, path: str) -> None:
    await _post(client, replica, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
    replica.adapters = replica.adapters | {name}


async def unload(client: httpx.AsyncClient, replica: Replica, name: str) -> None:
    await _post(client, replica, "/v1/unload_lora_adapter", {"lora_name": name})
    replica.adapters = replica.adapters - {name}


async def restore(client: httpx.AsyncClient, replica: Replica, wanted: dict[str, str]) -> None:
    """Give a (re)started server the runtime adapters it lacks. One that fails is logged and
    left out: the replica is then never chosen for it (``ReplicaPool.pick``)."""
    missing = {n: p for n, p in wanted.items() if n not in replica.adapters}
    results = await asyncio.gather(
        *(load(client, replica, name, path) for name, path in missing.items()),
        return_exceptions=True,
    )
    for name, result in zip(missing, results, strict=True):
        if isinstance(result, BaseException):
            log.error("%s: runtime adapter %s not restored: %s", replica.url, name, result)


async def _post(
    client: httpx.AsyncClient, replica: Replica, path: str, body: dict[str, str]
) -> None:
    headers = {"Authorization": f"Bearer {replica.api_key}"} if replica.api_key else {}
    try:
        # The call's own timeout, but the client's connect timeout (the config's).
        limit = httpx.Timeout(CALL_TIMEOUT, connect=client.timeout.connect)
        response = await client.post(replica.url + path, json=body, headers=headers, timeout=limit)
    except httpx.HTTPError as exc:
        raise AdapterError(replica, 0, repr(exc)) from exc
    if response.status_code != 200:
        raise AdapterError(replica, response.status_code, _message(response))


def _message(response: httpx.Response) -> str:
    """vLLM's error message, from its JSON error object or its plain text."""
    try:
        doc = response.json()
    except ValueError:
        return response.text[:500]
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])[:500]
    if isinstance(doc, dict) and "message" in doc:
        return str(doc["message"])[:500]
    return response.text[:500]
