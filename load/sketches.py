"""The relays load/floor.py measures: uvicorn in front of each HTTP client, and a raw server.

Each is a few lines of relaying and nothing else; `serve(kind, upstream, port)` runs one (the
floor starts each in its own process, pinned to CPU 1). See load/floor.py for what they show.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any
from urllib.parse import urlsplit


def aiohttp_relay(upstream: str) -> Any:
    import aiohttp

    session: list[aiohttp.ClientSession] = []

    async def relay(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _body(receive)
        if not session:
            session.append(
                aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=0),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                )
            )
        headers = {"content-type": "application/json"}
        async with session[0].post(upstream + scope["path"], data=body, headers=headers) as r:
            await _start(send, r.status, r.raw_headers)
            while chunk := await r.content.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return relay


def pyreqwest_relay(upstream: str) -> Any:
    from pyreqwest.client import Client, ClientBuilder

    client: list[Client] = []

    async def relay(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _body(receive)
        if not client:
            client.append(ClientBuilder().http1_only().gzip(False).build())
        request = (
            client[0]
            .post(upstream + scope["path"])
            .header("content-type", "application/json")
            .body_bytes(body)
            .build_streamed()
        )
        async with request as r:
            headers = [(k.encode(), v.encode()) for k, v in r.headers.items()]
            await _start(send, r.status, headers)
            reader = r.body_reader
            while (chunk := await reader.read_chunk()) is not None:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return relay


def aiosonic_relay(upstream: str) -> Any:
    import aiosonic

    client: list[aiosonic.HTTPClient] = []

    async def relay(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _body(receive)
        if not client:
            client.append(aiosonic.HTTPClient())
        r = await client[0].post(
            upstream + scope["path"], data=body, headers={"content-type": "application/json"}
        )
        await _start(send, r.status_code, [(k.encode(), v.encode()) for k, v in r.raw_headers])
        async for chunk in r.iter_bytes():  # a read_chunks() of a sized body waits forever
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return relay


def httpr_relay(upstream: str) -> Any:
    import httpr

    client: list[httpr.AsyncClient] = []

    async def relay(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _body(receive)
        if not client:
            client.append(httpr.AsyncClient())
        headers = {"content-type": "application/json"}
        async with client[0].stream(
            "POST", upstream + scope["path"], content=body, headers=headers
        ) as r:
            head = [(k.encode(), v.encode()) for k, v in r.headers.items()]
            await _start(send, r.status_code, head)
            async for chunk in r.aiter_bytes():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return relay


RELAYS = {"aiohttp": aiohttp_relay, "pyreqwest": pyreqwest_relay, "aiosonic": aiosonic_relay}
RELAYS["httpr"] = httpr_relay


class _Connection(asyncio.Protocol):
    """One keep-alive upstream connection: a request out, the response parsed as it comes."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def request(self, data: bytes) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.head: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head.set_result(self.parser.get_status_code())

    def on_body(self, body: bytes) -> None:
        self.chunks.put_nowait(body)

    def on_message_complete(self) -> None:
        self.chunks.put_nowait(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True


def raw_relay(upstream: str) -> Any:
    parts = urlsplit(upstream)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[_Connection] = []

    async def relay(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = await _body(receive)
        while idle and idle[-1].closed:
            idle.pop()
        if idle:
            conn = idle.pop()
        else:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, host, port)
        head = b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n" % (
            scope["path"].encode(),
            host.encode(),
            port,
        )
        conn.request(head + b"content-length: %d\r\n\r\n" % len(body) + body)
        await _start(send, await conn.head, conn.headers)
        while (chunk := await conn.chunks.get()) is not None:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        idle.append(conn)

    return relay


async def _body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _start(send: Any, status: int, headers: Any) -> None:
    kept = [(k, v) for k, v in headers if k.lower() not in (b"date", b"server")]
    await send({"type": "http.response.start", "status": status, "headers": kept})


class _RawServer(asyncio.Protocol):
    """One client connection, requests one after the other (the load client does not
    pipeline), each relayed over the raw client with no ASGI in between."""

    def __init__(self, host: str, port: int, idle: list[_Connection]) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.upstream, self.idle = (host, port), idle
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.body = b"", b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        asyncio.get_running_loop().create_task(self.relay(self.url, self.body))

    async def relay(self, url: bytes, body: bytes) -> None:
        while self.idle and self.idle[-1].closed:
            self.idle.pop()
        if self.idle:
            conn = self.idle.pop()
        else:
            _, conn = await asyncio.get_running_loop().create_connection(
                _Connection, *self.upstream
            )
        host, port = self.upstream
        conn.request(
            b"POST %s HTTP/1.1\r\nhost: %s:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (url, host.encode(), port, len(body), body)
        )
        status = await conn.head
        kept = [(k, v) for k, v in conn.headers if k.lower() not in (b"date", b"server")]
        chunked = not any(k.lower() == b"content-length" for k, _ in kept)
        head = b"HTTP/1.1 %d OK\r\n%s\r\n" % (
            status,
            b"".join(b"%s: %s\r\n" % (k, v) for k, v in kept),
        )
        assert self.transport is not None
        while (chunk := await conn.chunks.get()) is not None:
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
            self.transport.write(head + framed)
            head = b""
        self.transport.write(head + (b"0\r\n\r\n" if chunked else b""))
        self.idle.append(conn)


def serve_raw(upstream: str, port: int) -> None:
    import uvloop

    parts = urlsplit(upstream)
    host, upstream_port = parts.hostname or "127.0.0.1", parts.port or 80
    idle: list[_Connection] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _RawServer(host, upstream_port, idle), "127.0.0.1", port
        )
        await server.serve_forever()

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)
    uvloop.run(main())


def serve(kind: str, upstream: str, port: int) -> None:
    import uvicorn

    if kind == "raw-server":
        serve_raw(upstream, port)
        return
    relay = RELAYS.get(kind, raw_relay)(upstream)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            await relay(scope, receive, send)

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)  # as the gateway does (gateway.server.tune_gc)
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )
