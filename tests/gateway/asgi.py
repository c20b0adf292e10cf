"""One request driven into an ASGI app in-process, message by message, with no sockets: what
the app sent is seen as it is sent (httpx's ASGITransport returns a body only once it is
whole), and the client can leave at any moment (``leave``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from gateway.types import ASGIApp, Message

DEADLINE = 10.0  # seconds a test waits for an event before it fails


class Call:
    def __init__(
        self,
        app: ASGIApp,
        path: str = "/v1/chat/completions",
        body: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
        method: str = "POST",
    ) -> None:
        self.app = app
        self.scope: dict[str, Any] = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": b"",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
        self.messages: list[Message] = []
        self._body: bytes | None = body
        self._gone = asyncio.Event()
        self._sent = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> Call:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        await self.app(self.scope, self._receive, self._send)

    async def done(self) -> Call:
        """Run it to its end (starting it if need be)."""
        if self.task is None:
            self.start()
        await asyncio.wait_for(self.task, DEADLINE)  # type: ignore[arg-type]
        return self

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition`` holds after something was sent."""
        async with self._sent:
            await asyncio.wait_for(self._sent.wait_for(condition), DEADLINE)

    def leave(self) -> None:
        """The client disconnects."""
        self._gone.set()

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"]) if self.messages else {}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def ended(self) -> bool:
        """The response was completed (its last body message sent)."""
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )

    async def _receive(self) -> Message:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: Message) -> None:
        async with self._sent:
            self.messages.append(message)
            self._sent.notify_all()
