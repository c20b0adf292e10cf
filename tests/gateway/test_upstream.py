"""The relay's upstream pools: one per backend, closed when that backend is gone for good."""

from __future__ import annotations

from gateway.upstream import UpstreamClients


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
