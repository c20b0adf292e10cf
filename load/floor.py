"""The floor under the gateway's numbers: relays with no features at all, on the same core.

    .venv/bin/python load/floor.py [--seconds 4] [--repeats 3]    # load/results/floor-<date>.md

Sketches run next to the gateway (all on CPU 1, taking turns, the fake vLLM and the load
client on CPU 0, as in load/bench.py):

- ``uvicorn + aiohttp``: the stack the gateway is built on, relaying bytes and nothing else.
  What the gateway cannot beat without changing its stack.
- ``uvicorn + raw client``: the same, with aiohttp replaced by an asyncio protocol that writes
  the request in one send and parses the response with httptools (uvicorn's parser), over
  pooled keep-alive connections. What a leaner upstream client would buy.
- ``uvicorn + pyreqwest`` / ``+ aiosonic`` / ``+ httpr``: the maintained fast clients in the
  same place (`pip install -e .[bench]`), each used as its documentation shows for a streamed
  response: the candidates to replace aiohttp with before writing a client of our own.
- ``raw server + raw client``: no uvicorn and no ASGI either: an asyncio protocol parses the
  request with httptools and hands it to the raw client; the response goes back in one write
  (head with the first bytes). What a server protocol of the gateway's own could buy at most.

The sketches skip everything a product needs (errors, timeouts, retries, keys, metrics), so
the gap between them and the gateway is what those cost, and the gap between the sketches is
what aiohttp costs.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import FAKE_PORT, TARGET_PORT, scenarios, take_turns
from peers import ROOT, Target, pinned, start_fake, start_gateway, wait_http
from report import Rows, med

SCENARIOS = ("chat c=1", "chat c=64", "stream 64 chunks c=16")
SKETCHES = {
    "uvicorn + aiohttp": "aiohttp",
    "uvicorn + raw client": "raw",
    "uvicorn + pyreqwest": "pyreqwest",
    "uvicorn + aiosonic": "aiosonic",
    "uvicorn + httpr": "httpr",
    "raw server + raw client": "raw-server",
}


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


def start_sketch(name: str, kind: str, port: int, upstream: str) -> Target:
    cmd = [sys.executable, __file__, "--serve", kind, "--upstream", upstream, "--port", str(port)]
    proc = subprocess.Popen(pinned(1, cmd), cwd=ROOT, stderr=subprocess.DEVNULL)
    target = Target(name, port, [proc])
    wait_http(f"{target.url}/v1/models")  # any answer will do, even the fake's 404
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", choices=sorted(SKETCHES.values()))
    parser.add_argument("--upstream")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.upstream, args.port)
        return
    import uvloop

    uvloop.install()
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {0})
    fake = start_fake(FAKE_PORT)
    running = [Target("direct", FAKE_PORT)]
    results: Rows = {}
    try:
        for i, (name, kind) in enumerate(SKETCHES.items()):
            running.append(start_sketch(name, kind, TARGET_PORT + 10 * i, fake.url))
        running.append(start_gateway(TARGET_PORT + 10 * len(SKETCHES), fake.url))
        chosen = [s for s in scenarios() if s.name in SCENARIOS]
        results = take_turns(running, chosen, args.repeats, args.seconds)
    finally:
        for target in running[1:]:
            target.stop()
        fake.stop()
    write_report(results, args)


def write_report(results: Rows, args: Any) -> None:
    today = datetime.date.today().isoformat()
    lines = [
        f"# The floor under the gateway, {today}",
        "",
        f"`load/floor.py --seconds {args.seconds:g} --repeats {args.repeats}`: relays with no "
        "features next to the gateway, one core each, taking turns (see the script's "
        "docstring). Medians of the repeats; ms; CPU is the relay's own per request.",
        "",
        "| relay | " + " | ".join(f"{s} rps / p50 / p99 / CPU µs" for s in SCENARIOS) + " |",
        "|---|" + "---|" * len(SCENARIOS),
    ]
    for name, by_scenario in results.items():
        cells = []
        for scenario in SCENARIOS:
            rows = by_scenario[scenario]
            cpu = "-" if name == "direct" else f"{med(rows, 'cpu_us_per_request'):.0f}"
            cells.append(
                f"{med(rows, 'rps'):.0f} / {med(rows, 'p50_ms'):.2f} / "
                f"{med(rows, 'p99_ms'):.2f} / {cpu}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    direct = results["direct"]["chat c=1"]
    lines += ["", "Added p50 at c=1 over direct (ms):"]
    for name, by_scenario in results.items():
        if name != "direct":
            added = med(by_scenario["chat c=1"], "p50_ms") - med(direct, "p50_ms")
            lines.append(f"- {name}: {added:+.2f}")
    path = ROOT / "load" / "results" / f"floor-{today}.md"
    path.write_text("\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
