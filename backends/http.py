"""httpx clients for the gateway's own calls to a backend, over TCP or its unix socket."""

from __future__ import annotations

import httpx

from backends.pool import Replica


def client_for(replica: Replica, timeout: float | httpx.Timeout = 5.0) -> httpx.AsyncClient:
    """A client for one replica: a spawned server on a unix socket is reached through it."""
    if replica.uds is None:
        return httpx.AsyncClient(timeout=timeout)
    return httpx.AsyncClient(timeout=timeout, transport=httpx.AsyncHTTPTransport(uds=replica.uds))
