"""The gateway's side of its HTTP client (gateway/h1/): one pool per backend URL, the
headers that cross in each direction, and the one place where the client's exceptions become
gateway errors: ``translate`` maps one, and ``upstream_errors`` wraps a call, as httpx's
``map_httpcore_exceptions`` does. Only what the client is known to raise is translated (its
``UpstreamError`` family, ``OSError``, ``TimeoutError``: ``KNOWN``); anything else is a bug
and goes on, to the outer error boundary (``gateway.boundary``). Health checks and load
scrapes use httpx (backends/), off the request path.

The relay sees the client through three small protocols (``Upstreams``, ``UpstreamPool``,
``UpstreamResponse``), so tests can swap in backends served in-process
(``gateway.inprocess``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Protocol

from gateway import waits
from gateway.errors import BackendUnavailable, BadGateway, GatewayError, GatewayTimeout
from gateway.h1 import ClosedEarly, ConnectFailed, Malformed, Pool, UpstreamError
from gateway.traffic.priorities import PRIORITY_HEADER

# What the HTTP client raises on purpose; ``translate`` maps each of these and nothing else.
KNOWN = (UpstreamError, OSError, TimeoutError)
Known = UpstreamError | OSError | TimeoutError


class UpstreamResponse(Protocol):
    """A backend's response whose head has arrived (``gateway.h1.Response``)."""

    status: int
    raw_headers: list[tuple[bytes, bytes]]

    @property
    def content_type(self) -> str: ...

    @property
    def complete(self) -> bool: ...

    async def readany(self) -> bytes: ...

    def release(self) -> None: ...

    def close(self) -> None: ...


class UpstreamPool(Protocol):
    """Connections to one backend (``gateway.h1.Pool``)."""

    async def request(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
    ) -> UpstreamResponse: ...


class Upstreams(Protocol):
    """Every backend's pool by its URL (``UpstreamClients``)."""

    def pool(
        self, base_url: str, uds: str | None = None, connect_timeout: float | None = None
    ) -> UpstreamPool: ...

    async def get(
        self,
        base_url: str,
        uds: str | None,
        path: str,
        headers: list[tuple[bytes, bytes]],
        timeout: float,
    ) -> tuple[int, str, bytes]: ...


# RFC 9110 §7.6.1 connection-specific headers, plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {
    b"host",
    b"content-length",
    b"authorization",
    b"x-api-key",
    b"x-request-id",
    b"expect",
    b"x-vllm-priority",  # vLLM's own, which would win over the priority the gateway decided
    PRIORITY_HEADER,  # the gateway's: it has been read
}
_NOT_FORWARDED_UP_TRACED = _NOT_FORWARDED_UP | {b"traceparent", b"tracestate"}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}


class UpstreamClients:
    """Pools are created on first use, inside the running loop, and closed by the lifespan."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._pools: dict[str, Pool] = {}

    def pool(
        self, base_url: str, uds: str | None = None, connect_timeout: float | None = None
    ) -> Pool:
        """The pool of one backend; ``uds``: the unix socket it listens on, if it does;
        ``connect_timeout``: its model's own (`models[].timeouts.connect`), for the
        connections it opens from now on."""
        pool = self._pools.get(base_url)
        if pool is None:
            pool = self._pools[base_url] = Pool(
                base_url,
                uds=uds,
                connect_timeout=connect_timeout or self.connect_timeout,
                keepalive=waits.UPSTREAM_KEEPALIVE,
            )
        elif connect_timeout is not None and pool.connect_timeout != connect_timeout:
            pool.connect_timeout = connect_timeout  # a reload changed it
        return pool

    async def get(
        self,
        base_url: str,
        uds: str | None,
        path: str,
        headers: list[tuple[bytes, bytes]],
        timeout: float,
    ) -> tuple[int, str, bytes]:
        """A whole small response (status, Content-Type as sent, body) of a GET; upstream
        errors are UpstreamError, for ``upstream_errors`` to translate."""
        async with asyncio.timeout(timeout):
            response = await self.pool(base_url, uds).request("GET", path, headers)
            try:
                body = await response.read()
            except BaseException:
                response.close()
                raise
            response.release()
            return response.status, response.header(b"content-type") or "", body

    async def forget(self, base_url: str) -> None:
        """Close what was kept for a backend that is gone for good (a discovered pod that
        left: the next one has another address, so nothing would ever reuse it)."""
        pool = self._pools.pop(base_url, None)
        if pool is not None:
            pool.close()

    async def aclose(self) -> None:
        pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()


def target(path: str, query: bytes) -> str:
    """The request target a backend gets: the client's path and query, as sent."""
    return f"{path}?{query.decode('latin-1')}" if query else path


def upstream_headers(
    client_headers: list[tuple[bytes, bytes]],
    backend_key: str | None,
    request_id: str,
    trace: list[tuple[bytes, bytes]] | None = None,
) -> list[tuple[bytes, bytes]]:
    """Client headers minus hop-by-hop ones and the client's credentials, as the client sent
    them (bytes: they go out as they came in). ``trace``: the gateway's own `traceparent`
    (tracing on), which replaces the client's; without it the client's passes unchanged."""
    if trace is None:
        headers = _end_to_end(client_headers, _NOT_FORWARDED_UP)
    else:
        headers = _end_to_end(client_headers, _NOT_FORWARDED_UP_TRACED)
        headers += trace
    headers.append((b"X-Request-Id", request_id.encode("latin-1")))
    if backend_key:
        headers.append(bearer(backend_key))
    return headers


def bearer(key: str) -> tuple[bytes, bytes]:
    """The Authorization header a backend that wants ``key`` gets."""
    return (b"Authorization", b"Bearer " + key.encode("latin-1"))


def downstream_headers(upstream: UpstreamResponse, request_id: bytes) -> list[tuple[bytes, bytes]]:
    headers = _end_to_end(upstream.raw_headers, _NOT_FORWARDED_DOWN)
    headers.append((b"x-request-id", request_id))
    return headers


def _end_to_end(
    headers: list[tuple[bytes, bytes]], dropped: frozenset[bytes]
) -> list[tuple[bytes, bytes]]:
    """``headers`` minus ``dropped`` and minus those the Connection header names, which are
    hop-by-hop too (RFC 9110 §7.6.1: `Connection: close, X-Trace` keeps X-Trace off the
    next hop). One pass; a second, over what is kept, only for such a rare named header."""
    kept = []
    options = b""  # what the Connection header(s) said
    for name, value in headers:
        lower = name.lower()
        if lower == b"connection":
            options = options + b"," + value if options else value
        if lower not in dropped:
            kept.append((name, value))
    if options and (named := {o.strip().lower() for o in options.split(b",")} - dropped):
        kept = [(k, v) for k, v in kept if k.lower() not in named]
    return kept


@contextlib.contextmanager
def upstream_errors(model: str) -> Iterator[None]:
    """Calls into the client inside this block raise gateway errors for what it is known to
    raise; anything else goes on unchanged."""
    try:
        yield
    except KNOWN as exc:
        raise translate(exc, model) from exc


def translate(exc: Known, model: str, *, started: bool = False) -> GatewayError:
    """The gateway error for an upstream failure. ``started``: the response had begun."""
    if isinstance(exc, TimeoutError):
        what = "stopped sending" if started else "did not answer in time"
        return GatewayTimeout(f"The backend for model {model!r} {what}.")
    if isinstance(exc, ConnectFailed):
        return BackendUnavailable(
            f"The backend for model {model!r} is unreachable ({exc}).",
            retry_after=waits.RETRY_UNREACHABLE,
        )
    if isinstance(exc, Malformed):
        return BadGateway(f"The backend for model {model!r} sent a malformed response.")
    if isinstance(exc, ClosedEarly | OSError) and not started:
        # Refused, reset or closed before any answer, typically a kept-alive connection to a
        # server that just died: the client should retry, so 503 rather than 502.
        return BackendUnavailable(
            f"The backend for model {model!r} closed the connection before answering.",
            retry_after=waits.RETRY_UNREACHABLE,
        )
    return BadGateway(
        f"The backend for model {model!r} failed mid-response ({type(exc).__name__})."
    )
