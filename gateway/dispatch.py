"""The app's first step: relayed paths to the relay, the rest to the control API, the lifespan
to its owner. Its own module, so a worker process (``gateway.workers``) uses it without
importing the control API."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from gateway.routing import RELAYED_PATHS
from gateway.types import ASGIApp, Receive, Scope, Send


class Dispatcher:
    """Relayed paths go to the relay without FastAPI's routing; the rest to the control API.
    The lifespan is the dispatcher's own: the outermost app owns what runs beside requests."""

    def __init__(
        self,
        relay: ASGIApp,
        api: ASGIApp,
        lifespan: Callable[[], AbstractAsyncContextManager[None]],
    ) -> None:
        self.relay = relay
        self.api = api
        self.lifespan = lifespan

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in RELAYED_PATHS:
            await self.relay(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.api(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        """ASGI's lifespan protocol around ``self.lifespan``: startup, then shutdown."""
        await receive()  # lifespan.startup
        started = False
        try:
            async with self.lifespan():
                await send({"type": "lifespan.startup.complete"})
                started = True
                await receive()  # lifespan.shutdown
        except BaseException:
            phase = "shutdown" if started else "startup"
            await send({"type": f"lifespan.{phase}.failed", "message": traceback.format_exc()})
            raise
        await send({"type": "lifespan.shutdown.complete"})
