"""The upstream HTTP client: one keep-alive aiohttp session per backend URL.

aiohttp, not httpx, carries the relay: it relays several times the requests per second
(load/floor.py). aiohttp's exceptions are turned into gateway errors here and
nowhere else: ``translate`` maps one, and ``upstream_errors`` wraps every call into aiohttp made
outside the relay's own loop (the model catalog, the backend-metrics relay), as httpx's
``map_httpcore_exceptions`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp
import yarl

from gateway import waits
from gateway.errors import BackendUnavailable, BadGateway, GatewayError, GatewayTimeout

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
}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {b"date", b"server", b"x-request-id"}


class UpstreamClients:
    """Sessions are created on first use, inside the running loop, and closed by the lifespan."""

    def __init__(self, connect_timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._urls: dict[tuple[str, str], yarl.URL] = {}

    def url(self, base_url: str, path: str, query: bytes) -> yarl.URL:
        """The backend's URL for a path, parsed once per backend and path, not per request."""
        if query:
            return yarl.URL(f"{base_url}{path}?{query.decode('latin-1')}")
        url = self._urls.get((base_url, path))
        if url is None:
            url = self._urls[(base_url, path)] = yarl.URL(base_url + path)
        return url

    def session(self, base_url: str, uds: str | None = None) -> aiohttp.ClientSession:
        """The session of one backend; ``uds``: the unix socket it listens on, if it does."""
        session = self._sessions.get(base_url)
        if session is None:
            connector: aiohttp.BaseConnector
            if uds is not None:
                connector = aiohttp.UnixConnector(
                    path=uds, limit=0, keepalive_timeout=waits.UPSTREAM_KEEPALIVE
                )
            else:
                connector = aiohttp.TCPConnector(
                    limit=0, keepalive_timeout=waits.UPSTREAM_KEEPALIVE, ttl_dns_cache=300
                )
            session = aiohttp.ClientSession(
                base_url=None,
                connector=connector,
                timeout=self._timeout,
                auto_decompress=False,  # relay bytes exactly as the backend sent them
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                # A session shared by every client must not keep one client's cookies.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._sessions[base_url] = session
        return session

    async def forget(self, base_url: str) -> None:
        """Close what was kept for a backend that is gone for good (a discovered pod that
        left: the next one has another address, so nothing would ever reuse it)."""
        self._urls = {key: url for key, url in self._urls.items() if key[0] != base_url}
        session = self._sessions.pop(base_url, None)
        if session is not None:
            await session.close()

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


def upstream_headers(
    client_headers: list[tuple[bytes, bytes]], backend_key: str | None, request_id: str
) -> dict[str, str]:
    """Client headers minus hop-by-hop ones and the client's credentials."""
    headers = {
        k.decode("latin-1"): v.decode("latin-1")
        for k, v in client_headers
        if k.lower() not in _NOT_FORWARDED_UP
    }
    headers["X-Request-Id"] = request_id
    if backend_key:
        headers["Authorization"] = f"Bearer {backend_key}"
    return headers


def downstream_headers(
    upstream: aiohttp.ClientResponse, request_id: bytes
) -> list[tuple[bytes, bytes]]:
    headers = [(k, v) for k, v in upstream.raw_headers if k.lower() not in _NOT_FORWARDED_DOWN]
    headers.append((b"x-request-id", request_id))
    return headers


@contextlib.contextmanager
def upstream_errors(model: str) -> Iterator[None]:
    """Calls into aiohttp inside this block raise gateway errors only."""
    try:
        yield
    except GatewayError:
        raise
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise translate(exc, model) from exc


def translate(exc: BaseException, model: str, *, started: bool = False) -> GatewayError:
    """The gateway error for an upstream failure. ``started``: the response had begun."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        what = "stopped sending" if started else "did not answer in time"
        return GatewayTimeout(f"The backend for model {model!r} {what}.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return BackendUnavailable(
            f"The backend for model {model!r} is unreachable ({exc.os_error.strerror or exc}).",
            retry_after=waits.RETRY_UNREACHABLE,
        )
    if isinstance(exc, aiohttp.ClientConnectionError | OSError) and not started:
        # Refused, reset or closed before any answer, typically a kept-alive connection to a
        # server that just died: the client should retry, so 503 rather than 502.
        return BackendUnavailable(
            f"The backend for model {model!r} closed the connection before answering.",
            retry_after=waits.RETRY_UNREACHABLE,
        )
    if isinstance(exc, aiohttp.ClientError | OSError):
        return BadGateway(
            f"The backend for model {model!r} failed mid-response ({type(exc).__name__})."
        )
    return GatewayError(f"Unexpected error while relaying to model {model!r}.")
