"""API keys: a pure ASGI middleware in front of every path but the open ones.

Keys are compared in constant time, against every configured key (no early exit that would tell
an attacker how many keys there are or which one came close). The client's credentials are never
forwarded: the relay drops them and sends the backend's own key instead.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from gateway.errors import AuthenticationFailed, send_error
from gateway.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str], open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.keys = [key.encode() for key in keys]
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        error = AuthenticationFailed(
            "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`."
        )
        await send_error(send, error)

    def _authorized(self, scope: Scope) -> bool:
        presented = presented_key(scope["headers"])
        if presented is None:
            return False
        match = False
        for key in self.keys:
            match |= hmac.compare_digest(presented, key)
        return match


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
