"""API keys at the door: a pure ASGI middleware in front of every path but the open ones.

It identifies the caller's key (see ``gateway.keys``) and leaves it in the scope for the relay,
which applies the key's model allow-list and limits. The client's credentials are never
forwarded: the relay drops them and sends the backend's own key instead.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.errors import AuthenticationFailed, send_error
from gateway.keys import SCOPE_KEY, KeyRing
from gateway.request import read_head
from gateway.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        open_paths: frozenset[str] = OPEN_PATHS,
        on_refused: Callable[[str, str, int], None] | None = None,
    ):
        """``on_refused(request_id, path, status)``: told of each request turned away, so
        that a key being guessed shows in the access log and the metrics."""
        self.app = app
        self.keys = keys
        self.open_paths = open_paths
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope["headers"])
        key = self.keys.identify(presented) if presented is not None else None
        if key is None:
            error = AuthenticationFailed(
                "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`."
            )
            request_id = read_head(scope["headers"]).request_id
            await send_error(send, error, request_id)
            if self.on_refused is not None:
                self.on_refused(request_id.decode(), scope["path"], error.status)
            return
        scope[SCOPE_KEY] = key
        await self.app(scope, receive, send)


def presented_key(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key a client sent: `Authorization: Bearer` (OpenAI) or `x-api-key` (Anthropic)."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif lname == b"x-api-key" and value:
            return value
    return None
