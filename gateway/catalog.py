"""`GET /v1/models` and `/v1/models/{id}`: the names a client may send, in OpenAI's shapes.

A name outside a key's allow-list is not found, by the same code path and with the same
message as a name that does not exist. LoRA adapters are listed as models of their own, with
their base model as `parent` where the key may call the base.

Each backend's context length (`max_model_len`) is asked of the backend once, off the request
path of the relay, and remembered; a backend that does not answer is listed without it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from backends.pool import ReplicaPool
from gateway import waits
from gateway.errors import GatewayError
from gateway.routing import RouteTable
from gateway.upstream import UpstreamClients, Upstreams, bearer, upstream_errors


class ModelCatalog:
    def __init__(self, table: RouteTable, clients: UpstreamClients) -> None:
        self.table = table
        self.clients = clients
        self.created = int(time.time())

    async def listing(self, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        """The models a key may use (all when ``allowed`` is None)."""
        await self._learn_max_lens()
        names = self.table.names_for(allowed)
        return {"object": "list", "data": [self._card(n, allowed) for n in names]}

    async def card(self, name: str, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        """One model a key may use; ModelNotFound otherwise, as the relay says it."""
        self.table.resolve(name, allowed)
        await self._learn_max_lens()
        return self._card(name, allowed)

    async def _learn_max_lens(self) -> None:
        await asyncio.gather(
            *(
                learn_max_model_len(self.clients, p)
                for p in self.table.pools
                if p.max_model_len is None
            )
        )

    def _card(self, name: str, allowed: frozenset[str] | None) -> dict[str, Any]:
        route = self.table.resolve(name)
        pool = route.pool
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm-gateway",
            "root": route.name,
        }
        if route.adapter is not None and (allowed is None or pool.name in allowed):
            card["parent"] = pool.name  # as vLLM lists it; only to keys that may call the base
        if pool.max_model_len is not None:
            card["max_model_len"] = pool.max_model_len
        return card


async def learn_max_model_len(clients: Upstreams, pool: ReplicaPool) -> None:
    """Ask a ready replica's /v1/models for the model's context length, and keep it in
    ``pool.max_model_len``; a backend that does not answer is asked again next time."""
    replica = pool.pick()
    if replica is None:
        return
    headers = [bearer(replica.api_key)] if replica.api_key else []
    try:
        with upstream_errors(pool.name):
            status, _, body = await clients.get(
                replica.url, replica.uds, "/v1/models", headers, waits.MODEL_LOOKUP
            )
        if status != 200:
            return
        doc = orjson.loads(body)
    except (GatewayError, orjson.JSONDecodeError):
        return  # listed without its context length; asked again next time
    cards = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(cards, list):
        return
    lengths = [c.get("max_model_len") for c in cards if isinstance(c, dict)]
    pool.max_model_len = next((n for n in lengths if isinstance(n, int)), None)
