"""The relay's upstream sessions: one per backend, closed when that backend is gone for good."""

from __future__ import annotations

from gateway.upstream import UpstreamClients


async def test_a_forgotten_backend_has_its_session_closed() -> None:
    clients = UpstreamClients(connect_timeout=1)
    pod, other = "http://10.0.0.1:8000", "http://10.0.0.2:8000"
    session = clients.session(pod)
    assert clients.session(pod) is session  # one per backend, reused
    kept = clients.session(other)
    await clients.forget(pod)
    assert session.closed and not kept.closed
    assert clients.session(pod) is not session  # a new one, should that address come back
    await clients.aclose()
