"""Backends served in-process: the relay's upstream interface (``gateway.upstream.Upstreams``)
without sockets, as httpx's ``MockTransport`` is for httpx.

Each backend URL has a handler, an async function from the request it was sent (``Sent``) to
a ``Reply``; it may also raise what the HTTP client raises (``gateway.h1``'s ``ConnectFailed``,
``ClosedEarly``...), so the relay translates exactly what it would from a real socket. A reply's
body is given whole, or fed by the test as it goes (``feed``, ``end``, ``cut``), and it says how
the relay let go of it: ``released`` (read whole, the connection would be reused) or
``closed`` (dropped, which is how vLLM learns to abort a generation). Nothing here sleeps:
a test waits on the reply's events.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

import orjson

from gateway.h1 import ClosedMidBody, ConnectFailed


@dataclass(frozen=True, slots=True)
class Sent:
    """One request as a backend received it."""

    url: str
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class Reply:
    """A backend's response: its head at once, its body whole or fed as the test goes."""

    def __init__(
        self,
        status: int = 200,
        headers: Iterable[tuple[bytes, bytes]] = (),
        chunks: Iterable[bytes] = (),
        *,
        more: bool = False,
    ) -> None:
        """``more``: the body goes on after ``chunks``, until ``end`` or ``cut``."""
        self.status = status
        self.raw_headers = list(headers)
        self._chunks: deque[bytes] = deque(chunks)
        self._ended = not more
        self._error: BaseException | None = None
        self._changed = asyncio.Event()
        self.reading = asyncio.Event()  # set while the relay waits for more of the body
        self.released = self.closed = False
        self.let_go = asyncio.Event()  # set once released or closed

    @classmethod
    def json(cls, doc: object, status: int = 200) -> Reply:
        body = orjson.dumps(doc)
        return cls(status, [(b"content-type", b"application/json")], [body])

    @classmethod
    def stream(cls, events: Iterable[bytes] = (), *, more: bool = False) -> Reply:
        """An SSE stream of ``events`` (each a `data:` line's payload)."""
        head = [(b"content-type", b"text/event-stream")]
        return cls(200, head, [b"data: " + e + b"\n\n" for e in events], more=more)

    # the test's side

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._changed.set()

    def end(self) -> None:
        self._ended = True
        self._changed.set()

    def cut(self) -> None:
        """The backend dies mid-body: the relay's next read fails as a real one would."""
        self._error = ClosedMidBody("the backend closed the connection mid-body")
        self._changed.set()

    # the relay's side (gateway.upstream.UpstreamResponse)

    def header(self, name: bytes) -> str | None:
        value = next((v for k, v in self.raw_headers if k.lower() == name), None)
        return value.decode("latin-1") if value is not None else None

    @property
    def content_type(self) -> str:
        value = self.header(b"content-type") or "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    @property
    def complete(self) -> bool:
        return self._ended and not self._chunks

    async def readany(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            self._changed.clear()
            self.reading.set()
            try:
                await self._changed.wait()
            finally:
                self.reading.clear()
        data = b"".join(self._chunks)
        self._chunks.clear()
        return data

    def release(self) -> None:
        self.released = True
        self.let_go.set()

    def close(self) -> None:
        self.closed = True
        self.let_go.set()


Handler = Callable[[Sent], Awaitable[Reply]]


def script(*steps: Reply | BaseException) -> Handler:
    """A handler answering each request with the next step: a reply, or an exception raised."""
    pending = deque(steps)

    async def handle(sent: Sent) -> Reply:
        step = pending.popleft()
        if isinstance(step, BaseException):
            raise step
        return step

    return handle


def refused() -> Handler:
    """A backend nothing listens on: every connection is refused."""

    async def handle(sent: Sent) -> Reply:
        raise ConnectFailed("Connect call failed (in-process: refused)")

    return handle


class InProcessPool:
    """The pool of one in-process backend (``gateway.upstream.UpstreamPool``)."""

    def __init__(self, url: str, handler: Handler, log: list[Sent]) -> None:
        self.url = url
        self.handler = handler
        self.log = log

    async def request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> Reply:
        sent = Sent(self.url, method, target, headers, body)
        self.log.append(sent)
        return await self.handler(sent)


class InProcessUpstreams:
    """Every in-process backend by its URL (``gateway.upstream.Upstreams``); ``sent`` lists
    what each was sent, in order, and ``connect_timeouts`` what each pool was last asked to
    connect within."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self.sent: list[Sent] = []
        self.connect_timeouts: dict[str, float] = {}
        self._pools = {url: InProcessPool(url, h, self.sent) for url, h in handlers.items()}

    def pool(
        self, base_url: str, uds: str | None = None, connect_timeout: float | None = None
    ) -> InProcessPool:
        if connect_timeout is not None:
            self.connect_timeouts[base_url] = connect_timeout
        return self._pools[base_url]

    async def get(
        self,
        base_url: str,
        uds: str | None,
        path: str,
        headers: list[tuple[bytes, bytes]],
        timeout: float,
    ) -> tuple[int, str, bytes]:
        """A whole small response to a GET (the gateway's own calls, such as /v1/models)."""
        reply = await self._pools[base_url].request("GET", path, headers)
        body = b"".join([chunk async for chunk in _chunks(reply)])
        reply.release()
        return reply.status, reply.header(b"content-type") or "", body


async def _chunks(reply: Reply) -> AsyncIterator[bytes]:
    while chunk := await reply.readany():
        yield chunk
