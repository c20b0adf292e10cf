"""One connection to a backend (an asyncio protocol fed to httptools' response parser) and the
response being read from it."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools

from gateway.h1.errors import ClosedEarly, ClosedMidBody, Malformed, UpstreamError

if TYPE_CHECKING:
    from gateway.h1.pool import Pool

HIGH_WATER = 1 << 20  # bytes a response may buffer before its connection stops reading


class Response:
    """A response whose head has arrived; its body is read with ``readany``."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_error", "_waiter", "raw_headers", "status")
    _waiter: asyncio.Future[None] | None

    def __init__(self, conn: Connection, status: int, raw_headers: list[tuple[bytes, bytes]]):
        self._conn = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter = None
        self._error: BaseException | None = None
        self.status = status
        self.raw_headers = raw_headers

    def header(self, name: bytes) -> str | None:
        """The first value of a header (``name`` in lower case)."""
        for key, value in self.raw_headers:
            if key.lower() == name:
                return value.decode("latin-1")
        return None

    @property
    def content_type(self) -> str:
        """The media type alone, lower case: what the relay compares."""
        value = self.header(b"content-type")
        if value is None:
            return "application/octet-stream"
        return value.split(";", 1)[0].strip().lower()

    @property
    def complete(self) -> bool:
        return self._conn.body_done and not self._chunks

    async def readany(self) -> bytes:
        """What has arrived since the last call, waiting for something; b"" at the end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._conn.body_done:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        if self._buffered >= HIGH_WATER:
            self._conn.resume_reading()
        self._buffered = 0
        return data

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with it: a connection that finished cleanly goes back to its pool."""
        self._conn.release(reuse=self.complete)

    def close(self) -> None:
        """Drop the connection (the backend sees it go: vLLM aborts the generation)."""
        self._conn.release(reuse=False)

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered >= HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Connection(asyncio.Protocol):
    """One connection to a backend, one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.busy = False  # a request is out: its head or body is awaited
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.head: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self.response: Response | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.got_bytes = False
        self.body_done = False
        self.keep_alive = False
        self.delimited = True  # False: the body ends when the connection does
        self.interim = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:
            self.abort()  # bytes nobody asked for would be taken for the next answer
            return
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(Malformed("the backend switched protocols"))
        except httptools.HttpParserError as exc:
            self._broken(Malformed(f"malformed response from the backend ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if not self.busy:
            return  # an idle connection the server closed: nobody to tell
        if not self.head.done():
            what = "reset" if exc is not None else "closed"
            message = f"the backend {what} the connection before answering"
            self.head.set_exception(ClosedEarly(message, got_bytes=self.got_bytes))
        elif self.response is not None and not self.body_done:
            if self.delimited:
                self.response._fail(ClosedMidBody("the backend closed the connection mid-body"))
            else:
                self.body_done = True  # a close-delimited body ends here
                self.response._wake()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            self.interim, self.headers = True, []  # 100 Continue, 103 Early Hints: skipped
            return
        self.delimited = status in (204, 304) or any(
            (name := key.lower()) == b"content-length"
            or (name == b"transfer-encoding" and b"chunked" in value.lower())
            for key, value in self.headers
        )
        self.response = Response(self, status, self.headers)
        self.head.set_result(self.response)

    def on_body(self, body: bytes) -> None:
        if self.response is not None:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.keep_alive = self.parser.should_keep_alive()
        self.body_done = True
        if self.response is not None:
            self.response._wake()

    # the pool's side

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.transport.write(data)

    def release(self, reuse: bool) -> None:
        self.busy = False
        if reuse and self.keep_alive and not self.closed:
            self._reset()  # the parser, at a message's end, is ready for the next one
            self.pool.put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _broken(self, error: UpstreamError) -> None:
        if not self.head.done():
            self.head.set_exception(error)
        elif self.response is not None:
            self.response._fail(error)
        self.abort()
