"""The relay's HTTP/1.1 client: asyncio protocols parsed by httptools (uvicorn's parser, from
Node's llhttp), one pool of keep-alive connections per backend.

Why not a library: the maintained fast clients (pyreqwest, aiosonic, httpr) and aiohttp were
measured beside a raw client in load/floor.py and none came within 15 % of it
(load/results/floor-2026-11-30.md). This is that raw client made whole: each request goes out
in one write, each response chunk reaches the relay as the parser hands it over, and nothing
else happens per chunk.

What it does, and nothing more: Content-Length, chunked and close-delimited bodies; 1xx interim
responses skipped; keep-alive as the server allows it; a pooled connection that the server
closed while it sat idle is retried once on a fresh one, only when nothing of a response had
arrived; https through asyncio's SSL; unix sockets. No redirects, no cookies, no decompression:
the relay passes those through as they are. Its exceptions are its own (``UpstreamError``);
gateway.upstream turns them into gateway errors.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

HIGH_WATER = 1 << 20  # bytes a response may buffer before its connection stops reading


class UpstreamError(Exception):
    """Anything that went wrong talking to a backend."""


class ConnectFailed(UpstreamError):
    """No connection: refused, unreachable, name not found, or the connect timeout."""


class ClosedEarly(UpstreamError):
    """The connection ended (EOF or reset) before a whole response head arrived."""

    def __init__(self, message: str, *, got_bytes: bool) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class Malformed(UpstreamError):
    """The backend sent something that is not HTTP/1.1 (status line, headers, chunking)."""


class ClosedMidBody(UpstreamError):
    """The connection ended before the body announced by the head was complete."""


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

    @property
    def content_type(self) -> str:
        for name, value in self.raw_headers:
            if name.lower() == b"content-type":
                return value.split(b";", 1)[0].strip().decode("latin-1").lower()
        return "application/octet-stream"

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
        self.requests = 0  # sent on this connection: a reused one may have gone stale
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
        self.head_only = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(Malformed("the backend switched protocols"))
        except httptools.HttpParserError as exc:
            self._broken(Malformed(f"malformed response from the backend ({exc})"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
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
        self.pool.forget(self)

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
        names = {name.lower() for name, _ in self.headers}
        chunked = any(
            n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.headers
        )
        self.delimited = (
            chunked or b"content-length" in names or status in (204, 304) or self.head_only
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

    def send(self, data: bytes, head_only: bool) -> None:
        assert self.transport is not None
        self.requests += 1
        self.head_only = head_only
        self.transport.write(data)

    def release(self, reuse: bool) -> None:
        if reuse and self.keep_alive and not self.closed:
            self.parser = httptools.HttpResponseParser(self)
            self._reset()
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


class Pool:
    """Keep-alive connections to one backend (``base_url``, or the unix socket ``uds``)."""

    def __init__(
        self,
        base_url: str,
        *,
        uds: str | None = None,
        connect_timeout: float = 10.0,
        keepalive: float = 4.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        default_port = self.port == (443 if self.https else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = (host if default_port else f"{host}:{self.port}").encode("idna")
        self.prefix = parts.path.rstrip("/").encode("latin-1")
        self.uds = uds
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.ssl = (ssl_context or ssl.create_default_context()) if self.https else None
        self.idle: list[Connection] = []
        self.open: set[Connection] = set()
        self.closed = False

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes = b"",
    ) -> Response:
        """Send one request and wait for its response head (the body is read from it).
        ``target``: path and query, as the backend's root sees them."""
        data = self._encode(method, target, headers, body)
        head_only = method == "HEAD"
        while True:
            conn = self._idle_connection()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.send(data, head_only)
                return await conn.head
            except ClosedEarly as exc:
                conn.abort()
                if reused and not exc.got_bytes:
                    self._drop_idle()  # the server closed it while it sat idle (and likely
                    continue  # the others too): the request never reached it
                raise
            except BaseException:
                conn.abort()  # cancelled or failed: the backend must see the request go
                raise

    def _encode(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> bytes:
        lines = [
            b"%s %s%s HTTP/1.1\r\nHost: %s\r\n"
            % (method.encode("ascii"), self.prefix, target.encode("latin-1"), self.authority)
        ]
        lines += [b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        lines.append(body)
        return b"".join(lines)

    def _drop_idle(self) -> None:
        for conn in self.idle:
            conn.abort()
        self.idle.clear()

    def _idle_connection(self) -> Connection | None:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive:
                return conn
            conn.abort()
        return None

    async def _connect(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.uds is not None:
                    _, conn = await loop.create_unix_connection(lambda: Connection(self), self.uds)
                else:
                    _, conn = await loop.create_connection(
                        lambda: Connection(self),
                        self.host,
                        self.port,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None,
                    )
        except TimeoutError as exc:
            raise ConnectFailed("connect timeout") from exc
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from exc
        self.open.add(conn)
        return conn

    def put_back(self, conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def forget(self, conn: Connection) -> None:
        self.open.discard(conn)

    def close(self) -> None:
        """Drop every connection, idle or in use (a backend gone for good, or shutdown)."""
        self.closed = True
        for conn in list(self.open):
            conn.abort()
        self.idle.clear()
        self.open.clear()
