"""`timeouts.connect` bounds every connection the gateway opens, its own calls included: a
backend that never accepts is given up on after that many seconds, not after a call's whole
timeout."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from tests.helpers import wait_until
from tests.servers import running_gateway

pytestmark = pytest.mark.servers  # starts servers on loopback


@pytest.fixture
def never_accepts() -> Iterator[str]:
    """A loopback port whose listen queue is full: a connection to it is never established."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(3):
        client = socket.socket()
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):  # the connect stays under way
            client.connect(("127.0.0.1", port))
        queued.append(client)
    yield f"http://127.0.0.1:{port}"
    for sock in [*queued, listener]:
        sock.close()


def test_health_checks_give_up_connecting_after_the_connect_timeout(
    never_accepts: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Each check may take a minute, connecting only a fraction of a second: four failed
    # checks take the replica out long before one check's own timeout, or four of the
    # health checker's fallback connect timeout (5 s), could end.
    health = {"interval": 0.1, "timeout": 60, "unhealthy_threshold": 4}
    model = {"name": "stuck", "url": never_accepts, "health": health}
    with running_gateway([model], timeouts={"connect": 0.2}):
        wait_until(
            lambda: "unhealthy after 4 failed checks" in caplog.text, 15, "four failed checks"
        )
