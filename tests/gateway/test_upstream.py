"""The relay's upstream side: one pool per backend, closed when that backend is gone for good;
which headers cross the gateway in each direction; which of the client's failures become
which gateway errors (only those it is known to raise)."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.h1 import ClosedEarly, ClosedMidBody, ConnectFailed, Malformed, Response
from gateway.upstream import (
    UpstreamClients,
    downstream_headers,
    translate,
    upstream_errors,
    upstream_headers,
)


async def test_a_forgotten_backend_has_its_pool_closed() -> None:
    clients = UpstreamClients(connect_timeout=1)
    pod, other = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    pool = clients.pool(pod)
    assert clients.pool(pod) is pool  # one per backend, reused
    kept = clients.pool(other)
    await clients.forget(pod)
    assert pool.closed and not kept.closed
    assert clients.pool(pod) is not pool  # a new one, should that address come back
    await clients.aclose()


HOP_BY_HOP = [
    (b"Connection", b"keep-alive, X-Trace"),  # names X-Trace as hop-by-hop too
    (b"Keep-Alive", b"timeout=5"),
    (b"X-Trace", b"hop-1"),
    (b"TE", b"trailers"),
    (b"Upgrade", b"h2c"),
    (b"Proxy-Authorization", b"Basic eA=="),
    (b"Transfer-Encoding", b"chunked"),
]


def test_hop_by_hop_headers_and_client_credentials_stay_on_the_clients_hop() -> None:
    client = [
        (b"Host", b"gateway"),
        (b"Authorization", b"Bearer sk-client"),
        (b"x-api-key", b"sk-client"),
        (b"Content-Length", b"12"),
        *HOP_BY_HOP,
        (b"X-Custom", b"Kept As Sent"),
    ]
    sent = upstream_headers(client, "sk-backend", "req-1")
    assert sent == [
        (b"X-Custom", b"Kept As Sent"),
        (b"X-Request-Id", b"req-1"),
        (b"Authorization", b"Bearer sk-backend"),
    ]


def test_hop_by_hop_headers_of_the_backend_stay_on_its_hop() -> None:
    backend: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"date", b"Mon, 30 Nov 2026 18:00:00 GMT"),  # the gateway's server writes its own
        (b"server", b"uvicorn"),
        *HOP_BY_HOP,
        (b"set-cookie", b"a=b"),
    ]
    response = Response(None, 200, backend)  # type: ignore[arg-type]
    assert downstream_headers(response, b"req-1") == [
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=b"),
        (b"x-request-id", b"req-1"),
    ]


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (ConnectFailed("refused"), 503, "backend_unavailable"),
        (ClosedEarly("closed", got_bytes=False), 503, "backend_unavailable"),
        (ConnectionResetError(), 503, "backend_unavailable"),
        (Malformed("not HTTP"), 502, "bad_gateway"),
        (TimeoutError(), 504, "upstream_timeout"),
    ],
)
def test_the_clients_known_failures_become_gateway_errors(
    exc: Exception, status: int, code: str
) -> None:
    with pytest.raises(GatewayError) as raised, upstream_errors("m"):
        raise exc
    assert (raised.value.status, raised.value.code) == (status, code)
    assert "'m'" in raised.value.message


def test_a_failure_after_the_response_began_is_502() -> None:
    assert translate(ConnectionResetError(), "m", started=True).code == "bad_gateway"
    assert translate(ClosedMidBody("cut"), "m", started=True).code == "bad_gateway"


@pytest.mark.parametrize("exc", [KeyError("bug"), ValueError("bug"), RuntimeError("bug")])
def test_anything_else_is_not_translated_but_goes_on(exc: Exception) -> None:
    """As httpx's map_httpcore_exceptions: an exception it does not know is a bug to show."""
    with pytest.raises(type(exc)), upstream_errors("m"):
        raise exc
