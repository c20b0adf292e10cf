"""Who may reach what: a pure ASGI middleware in front of every path.

Four kinds of caller. Admin keys see and do everything; monitor keys also read the ops
surfaces (metrics, status, each backend's own metrics) but change nothing; unrestricted keys
call every model; model-limited keys call only theirs (the relay checks that, so a model
outside a key's list is reported exactly as one that does not exist). The ops surfaces show
every model and every key's name, so only admin and monitor keys may read them, unless the
operator opens one (`open_endpoints`); `/admin/*` can never be opened.

The middleware identifies the caller's key (see ``gateway.keys``) and leaves it in the scope
for the layers below. The client's credentials are never forwarded: the relay drops them and
sends the backend's own key instead.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import IntEnum

from gateway.errors import AuthenticationFailed, GatewayError, PermissionDenied, send_error
from gateway.keys import SCOPE_KEY, ApiKey, KeyRing
from gateway.request import read_head
from gateway.types import ASGIApp, Receive, Scope, Send


class Access(IntEnum):
    """What a path needs, from least to most."""

    OPEN = 0  # no key at all
    KEY = 1  # any valid key
    MONITOR = 2  # a monitor or admin key
    ADMIN = 3  # an admin key


OPEN_PATHS = frozenset({"/health", "/status"})  # /status is a page without data
MONITOR_PATHS = {"metrics": "/metrics", "status": "/status.json"}
BACKEND_METRICS = "/backends/"
ADMIN_PREFIX = "/admin/"


def access_policy(opened: frozenset[str]) -> Callable[[str], Access]:
    """What each path needs, given the ops surfaces the operator opened (`open_endpoints`)."""
    open_paths = OPEN_PATHS | {MONITOR_PATHS[name] for name in opened if name in MONITOR_PATHS}
    monitor_paths = frozenset(MONITOR_PATHS.values()) - open_paths
    backend_metrics = Access.OPEN if "backend_metrics" in opened else Access.MONITOR

    def needs(path: str) -> Access:
        if path in open_paths:
            return Access.OPEN
        if path in monitor_paths:
            return Access.MONITOR
        if path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX[:-1]:
            return Access.ADMIN
        if path.startswith(BACKEND_METRICS):
            return backend_metrics
        return Access.KEY

    return needs


def allowed(key: ApiKey, needs: Access) -> bool:
    if needs is Access.ADMIN:
        return key.admin
    if needs is Access.MONITOR:
        return key.admin or key.monitor
    return True


class AccessMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        keys: KeyRing,
        needs: Callable[[str], Access],
        on_refused: Callable[[str, str, int], None] | None = None,
    ):
        """``on_refused(request_id, path, status)``: told of each request turned away, so
        that a key being guessed shows in the access log and the metrics."""
        self.app = app
        self.keys = keys
        self.needs = needs
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needs = self.needs(scope["path"])
        if needs is Access.OPEN or (needs is not Access.ADMIN and not self.keys.enabled):
            await self.app(scope, receive, send)  # a gateway without keys is open, but /admin
            return
        presented = presented_key(scope["headers"])
        key = self.keys.identify(presented) if presented is not None else None
        if key is None and self.keys.enabled:
            error: GatewayError = AuthenticationFailed(
                "Incorrect or missing API key. Send it as `Authorization: Bearer <key>`."
            )
        elif key is None or not allowed(key, needs):
            error = PermissionDenied(
                "This key may not use this endpoint; it needs an admin key."
                if needs is Access.ADMIN
                else "This key may not read the gateway's metrics and status; it needs a "
                "monitor or admin key."
            )
        else:
            scope[SCOPE_KEY] = key
            await self.app(scope, receive, send)
            return
        request_id = read_head(scope["headers"]).request_id
        await send_error(send, error, request_id, scope["path"])
        if self.on_refused is not None:
            self.on_refused(request_id.decode(), scope["path"], error.status)


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
