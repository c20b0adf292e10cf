"""The port the workers share: one SO_REUSEPORT group, and no sharing with another gateway."""

from __future__ import annotations

import socket

import pytest

from gateway.workers.listener import bound, reserve


def test_workers_bind_the_port_the_control_plane_holds() -> None:
    holder, port = reserve("127.0.0.1", 0)
    workers = [bound("127.0.0.1", port) for _ in range(2)]
    try:
        for sock in workers:
            sock.listen()
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.close()
    finally:
        for sock in [holder, *workers]:
            sock.close()


def test_a_port_another_gateway_holds_is_refused_not_shared() -> None:
    """Its holder and workers set SO_REUSEPORT, which would let a second one join them."""
    holder, port = reserve("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            reserve("127.0.0.1", port)
    finally:
        holder.close()
