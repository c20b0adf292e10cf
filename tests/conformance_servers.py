"""One small backend, served by the HTTP servers a gateway meets: uvicorn with httptools and
with h11 (vLLM's server), aiohttp's server, and nginx in front of them. The relay's client is
run against each (tests/gateway/test_h1_conformance.py).

    python tests/conformance_servers.py uvicorn-httptools|uvicorn-h11|aiohttp PORT

Paths: /len (a Content-Length body), /chunks (three chunks, 50 ms apart, chunked), /empty
(204), /big-header (a 16 KiB header), /echo (the request body back), and /v1/chat/completions
(a vLLM-shaped stream, for a relay through the gateway).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

CHUNKS = [b"data: one\n\n", b"data: two\n\n", b"data: [DONE]\n\n"]
BIG = b"b" * 16 * 1024


async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]

    async def start(status: int, *headers: tuple[bytes, bytes]) -> None:
        await send({"type": "http.response.start", "status": status, "headers": list(headers)})

    if path == "/len":
        await start(200, (b"content-type", b"text/plain"), (b"content-length", b"5"))
        await send({"type": "http.response.body", "body": b"hello"})
    elif path in ("/chunks", "/v1/chat/completions"):
        await start(200, (b"content-type", b"text/event-stream"))
        for chunk in CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0.05)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/empty":
        await start(204)
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big-header":
        await start(200, (b"x-big", BIG), (b"content-length", b"0"))
        await send({"type": "http.response.body", "body": b""})
    else:
        await start(200, (b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.body", "body": body})


def aiohttp_app() -> Any:
    from aiohttp import web

    async def length(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"hello", content_type="text/plain")

    async def chunks(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in CHUNKS:
            await response.write(chunk)
            await asyncio.sleep(0.05)
        await response.write_eof()
        return response

    async def empty(request: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def big_header(request: web.Request) -> web.StreamResponse:
        return web.Response(headers={"X-Big": BIG.decode()})

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_get("/len", length)
    app.router.add_get("/chunks", chunks)
    app.router.add_post("/v1/chat/completions", chunks)
    app.router.add_get("/empty", empty)
    app.router.add_get("/big-header", big_header)
    app.router.add_post("/echo", echo)
    return app


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    if kind == "aiohttp":
        from aiohttp import web

        web.run_app(aiohttp_app(), host="127.0.0.1", port=port, print=None)
        return
    import uvicorn

    http = "h11" if kind == "uvicorn-h11" else "httptools"
    uvicorn.run(asgi, host="127.0.0.1", port=port, http=http, log_level="warning")


if __name__ == "__main__":
    main()
