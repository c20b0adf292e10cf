"""Which paths the gateway relays, and which backend serves a given `model`.

Only configured backends are reachable: a `model` value is looked up in a dict and never
becomes part of an upstream URL or host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from backends.pool import ReplicaPool
from gateway.errors import ModelNotFound

# vLLM's JSON endpoints that carry `model` in the body. Which of them a backend really serves
# depends on its model (generate or pooling); a backend without the route answers its own 404.
JSON_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v2/embed",  # Cohere's embed API
        "/v1/rerank",
        "/rerank",
        "/v2/rerank",
        "/v1/score",
        "/score",
        "/pooling",
        "/classify",
        "/tokenize",
        "/detokenize",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
    }
)
# Multipart uploads: `model` is a form field.
MULTIPART_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
RELAYED_PATHS = JSON_PATHS | MULTIPART_PATHS


@dataclass(frozen=True, slots=True)
class Route:
    pool: ReplicaPool
    via_alias: bool  # the client named an alias; the body's `model` must become pool.name
    adapter: str | None = None  # a LoRA adapter of pool's model: only replicas holding it serve

    @property
    def name(self) -> str:
        """The model this route stands for: the adapter, or the pool's model."""
        return self.adapter or self.pool.name


class RouteTable:
    """Model names and aliases to the replica pool that serves them. A LoRA adapter is a
    model name too: served by the pool of its base model, by whichever replicas hold it (as
    they report it; see ``backends.adapters``)."""

    def __init__(
        self,
        pools: Iterable[tuple[ReplicaPool, list[str]]],
        adapters: Mapping[str, list[str]] | None = None,
    ) -> None:
        """``adapters``: model name -> the adapters its config names, routed (and answered
        503 while loading) before any replica reports them."""
        self._routes: dict[str, Route] = {}
        self.pools: list[ReplicaPool] = []
        self.replace(pools, adapters)

    def replace(
        self,
        pools: Iterable[tuple[ReplicaPool, list[str]]],
        adapters: Mapping[str, list[str]] | None = None,
    ) -> None:
        """Route by these from now on (a reload); a request routed already keeps its pool."""
        routes: dict[str, Route] = {}
        chosen: list[ReplicaPool] = []
        for pool, aliases in pools:
            chosen.append(pool)
            routes[pool.name] = Route(pool, via_alias=False)
            for alias in aliases:
                routes[alias] = Route(pool, via_alias=True)
            for adapter in (adapters or {}).get(pool.name, []):
                routes[adapter] = Route(pool, via_alias=False, adapter=adapter)
        self._routes, self.pools = routes, chosen

    def resolve(self, model: str, allowed: frozenset[str] | None = None) -> Route:
        """The route for a name. A model outside ``allowed`` is reported as not existing."""
        route = self._routes.get(model) or self._adapter(model)
        if route is None or (allowed is not None and route.name not in allowed):
            raise ModelNotFound(
                f"The model {_shorten(model)!r} does not exist on this gateway. "
                f"Available models: {', '.join(self.names_for(allowed)) or 'none'}.",
                param="model",
            )
        return route

    def _adapter(self, name: str) -> Route | None:
        for pool in self.pools:
            if name in pool.adapters:
                return Route(pool, via_alias=False, adapter=name)
        return None

    def adapter_names(self) -> list[str]:
        """Adapters some replica serves now, each once; a name that is already a model's
        name or alias is never an adapter here."""
        found = [a for p in self.pools for a in sorted(p.adapters) if a not in self._routes]
        return list(dict.fromkeys(found))

    @property
    def names(self) -> list[str]:
        """Every name a client may send, canonical names, aliases and adapters, each once."""
        return [*self._routes, *self.adapter_names()]

    def names_for(self, allowed: frozenset[str] | None) -> list[str]:
        if allowed is None:
            return self.names
        return [name for name in self.names if self.resolve(name).name in allowed]


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
