"""Which paths the gateway relays, and which backend serves a given `model`.

Only configured backends are reachable: a `model` value is looked up in a dict and never
becomes part of an upstream URL or host.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class RouteTable:
    """Model names and aliases to the replica pool that serves them."""

    def __init__(self, pools: Iterable[tuple[ReplicaPool, list[str]]]) -> None:
        self._routes: dict[str, Route] = {}
        self.pools: list[ReplicaPool] = []
        for pool, aliases in pools:
            self.pools.append(pool)
            self._routes[pool.name] = Route(pool, via_alias=False)
            for alias in aliases:
                self._routes[alias] = Route(pool, via_alias=True)

    def resolve(self, model: str, allowed: frozenset[str] | None = None) -> Route:
        """The route for a name. A model outside ``allowed`` is reported as not existing."""
        route = self._routes.get(model)
        if route is None or (allowed is not None and route.pool.name not in allowed):
            raise ModelNotFound(
                f"The model {_shorten(model)!r} does not exist on this gateway. "
                f"Available models: {', '.join(self.names_for(allowed)) or 'none'}.",
                param="model",
            )
        return route

    @property
    def names(self) -> list[str]:
        """Every name a client may send, canonical names and aliases, each once."""
        return list(self._routes)

    def names_for(self, allowed: frozenset[str] | None) -> list[str]:
        if allowed is None:
            return self.names
        return [name for name, route in self._routes.items() if route.pool.name in allowed]


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
