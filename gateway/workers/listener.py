"""The listening port, shared by the workers: one socket each, in one SO_REUSEPORT group.

Every worker binds its own socket to the gateway's address with SO_REUSEPORT, and the kernel
spreads new connections over the group by a hash of their addresses. Workers that inherit
one listening socket instead compete for each connection: every one is woken, and the first
to run accepts a whole burst (asyncio accepts up to its backlog per wake-up): see
``load/workers_accept.py``. Envoy's workers listen the same way.

The control plane binds one more socket in the group and never listens on it: it holds the
address while workers come and go (no other program can take it between a worker's death and
its restart), and it learns the port the kernel chose when the config asks for port 0. A
socket that does not listen is given no connections.
"""

from __future__ import annotations

import socket


def bound(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` in the address's reuse-port group, not listening yet
    (uvicorn listens once the worker's lifespan has started: no connection waits for it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """The control plane's hold on the address, and the port it is bound to. OSError if the
    address is taken, by any program: a plain bind is tried first, since one with
    SO_REUSEPORT would join another gateway's group on the same port (same user) and share it
    without a word."""
    if port:
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            probe.bind((host, port))
        finally:
            probe.close()
    sock = bound(host, port)
    return sock, sock.getsockname()[1]
