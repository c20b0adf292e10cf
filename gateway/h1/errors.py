"""What can go wrong talking to a backend, as the client reports it (gateway.upstream turns
these into gateway errors)."""

from __future__ import annotations


class UpstreamError(Exception):
    """Anything that went wrong talking to a backend."""


class ConnectFailed(UpstreamError):
    """No connection: refused, unreachable, name not found, or the connect timeout."""


class ClosedEarly(UpstreamError):
    """The connection ended (EOF or reset) before a whole response head arrived."""

    def __init__(self, message: str, *, got_bytes: bool) -> None:
        super().__init__(message)
        self.got_bytes = got_bytes


class Malformed(UpstreamError):
    """The backend sent something that is not HTTP/1.1 (status line, headers, chunking)."""


class ClosedMidBody(UpstreamError):
    """The connection ended before the body announced by the head was complete."""
