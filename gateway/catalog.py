"""`GET /v1/models`: every name a client may send, in OpenAI's list shape.

Each backend's context length (`max_model_len`) is asked of the backend once, off the request
path of the relay, and remembered; a backend that does not answer is listed without it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from backends.pool import ReplicaPool
from gateway.routing import RouteTable
from gateway.upstream import UpstreamClients

LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=3)


class ModelCatalog:
    def __init__(self, table: RouteTable, clients: UpstreamClients) -> None:
        self.table = table
        self.clients = clients
        self.created = int(time.time())

    async def listing(self, allowed: frozenset[str] | None = None) -> dict[str, Any]:
        """The models a key may use (all when ``allowed`` is None)."""
        await asyncio.gather(
            *(self._learn_max_len(p) for p in self.table.pools if p.max_model_len is None)
        )
        data = []
        for name in self.table.names_for(allowed):
            pool = self.table.resolve(name).pool
            card: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm-gateway",
                "root": pool.name,
            }
            if pool.max_model_len is not None:
                card["max_model_len"] = pool.max_model_len
            data.append(card)
        return {"object": "list", "data": data}

    async def _learn_max_len(self, pool: ReplicaPool) -> None:
        replica = pool.pick()
        if replica is None:
            return
        headers = {"Authorization": f"Bearer {replica.api_key}"} if replica.api_key else {}
        session = self.clients.session(replica.url)
        try:
            async with session.get(
                replica.url + "/v1/models", headers=headers, timeout=LOOKUP_TIMEOUT
            ) as response:
                if response.status != 200:
                    return
                cards = orjson.loads(await response.read()).get("data", [])
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, AttributeError):
            return
        lengths = [c.get("max_model_len") for c in cards if isinstance(c, dict)]
        pool.max_model_len = next((n for n in lengths if isinstance(n, int)), None)
