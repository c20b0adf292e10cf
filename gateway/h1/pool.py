"""Keep-alive connections to one backend, and the request: one write out, the head awaited."""

from __future__ import annotations

import asyncio
import ssl
import time
from urllib.parse import urlsplit

from gateway.h1.connection import Connection, Response
from gateway.h1.errors import ClosedEarly, ConnectFailed


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
        headers: list[tuple[bytes, bytes]],
        body: bytes = b"",
    ) -> Response:
        """Send one request and wait for its response head (the body is read from it).
        ``target``: path and query, as the backend's root sees them."""
        data = self._encode(method, target, headers, body)
        while True:
            conn = self._idle_connection()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                conn.send(data)
                return await conn.head
            except ClosedEarly as exc:
                conn.abort()
                if reused and not exc.got_bytes:
                    self._drop_idle()  # the server closed it while it sat idle (and likely
                    continue  # the others too): the request never reached it
                raise
            except BaseException:
                conn.head.cancel()  # nobody waits for it any more
                conn.abort()  # cancelled or failed: the backend must see the request go
                raise

    def _encode(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> bytes:
        lines = [
            b"%s %s%s HTTP/1.1\r\nHost: %s\r\n"
            % (method.encode("ascii"), self.prefix, target.encode("latin-1"), self.authority)
        ]
        lines += [b"%s: %s\r\n" % header for header in headers]
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
