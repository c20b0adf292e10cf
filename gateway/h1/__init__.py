"""The relay's HTTP/1.1 client: asyncio protocols parsed by httptools (uvicorn's parser, from
Node's llhttp), one pool of keep-alive connections per backend.

Why not a library: the maintained fast clients (pyreqwest, aiosonic, httpr) and aiohttp were
measured beside a raw client in load/floor.py and none came within 15 % of it
(load/results/floor-2026-11-30.md). This is that raw client made whole: each request goes out
in one write, each response chunk reaches the relay as the parser hands it over, and nothing
else happens per chunk.

What it does, and nothing more (GET and POST: no HEAD, whose responses announce a body they do
not send): Content-Length, chunked and close-delimited bodies; 1xx interim
responses skipped; keep-alive as the server allows it; a pooled connection that the server
closed while it sat idle is retried once on a fresh one, only when nothing of a response had
arrived; https through asyncio's SSL; unix sockets. No redirects, no cookies, no decompression:
the relay passes those through as they are. Its exceptions are its own (``UpstreamError``);
gateway.upstream turns them into gateway errors.
"""

from gateway.h1.connection import Connection, Response
from gateway.h1.errors import ClosedEarly, ClosedMidBody, ConnectFailed, Malformed, UpstreamError
from gateway.h1.pool import Pool

__all__ = [
    "ClosedEarly",
    "ClosedMidBody",
    "ConnectFailed",
    "Connection",
    "Malformed",
    "Pool",
    "Response",
    "UpstreamError",
]
