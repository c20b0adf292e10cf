"""A response's head goes out with its first body bytes: one socket write where uvicorn makes two.

uvicorn writes the status line and headers as soon as the app sends ``http.response.start``,
then each body message on its own. Every write is a system call, and on loopback the kernel
does the receiver's TCP work inside it too, so the head's write was the gateway's single
largest cost per relayed request (load/results/profile-2026-11-30.md). Here the head is held
until the first body message, which the relay sends in the same turn of the event loop for a
response that has arrived whole; a head with no body behind it (a stream still waiting for its
first token) is written on the loop's next turn, so a client never waits longer for headers.

Everything else is uvicorn's ``RequestResponseCycle.send``, kept in step with it: the same
header checks, framing, keep-alive and completion. uvicorn's access log is not written here:
the gateway turns it off and writes its own (``gateway.access_log``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    RequestResponseCycle,
)


class CoalescingCycle(RequestResponseCycle):
    """uvicorn's cycle for one request, with the head held for the first body write."""

    _held: bytes | None = None

    async def send(self, message: Any) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.transport.is_closing():
            return  # the client is gone (uvloop raises on a write to a closed transport)
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"Expected 'http.response.start', but got {kind!r}.")
            self._held = self._head(message["status"], message.get("headers", ()))
            asyncio.get_running_loop().call_soon(self._flush)
        elif not self.response_complete:
            if kind != "http.response.body":
                raise RuntimeError(f"Expected 'http.response.body', but got {kind!r}.")
            self._body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"Unexpected ASGI message {kind!r} sent, after response completed.")

    def _head(self, status: int, headers: Any) -> bytes:
        self.response_started = True
        self.waiting_for_100_continue = False
        content = [STATUS_LINE[status]]
        closing = False
        for name, value in (*self.default_headers, *headers):
            if HEADER_RE.search(name):
                raise RuntimeError("Invalid HTTP header name.")
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            name = name.lower()
            if name == b"content-length" and self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
            elif name == b"connection" and b"close" in [
                token.lower().strip() for token in value.split(b",")
            ]:
                self.keep_alive = False
                closing = True
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not closing:
            content.append(b"connection: close\r\n")
        no_body = self.scope["method"] == "HEAD" or status in (204, 304)
        if self.chunked_encoding is None and not no_body:
            self.chunked_encoding = True  # neither Content-Length nor Transfer-Encoding given
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)

    def _body(self, body: bytes, more_body: bool) -> None:
        if self.scope["method"] == "HEAD":
            self.expected_content_length = 0
            data = b""
        elif self.chunked_encoding:
            data = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            if not more_body:
                data += b"0\r\n\r\n"
        else:
            if len(body) > self.expected_content_length:
                raise RuntimeError("Response content longer than Content-Length")
            self.expected_content_length -= len(body)
            data = body
        if self._held is not None:
            data, self._held = self._held + data, None
        if data:
            self.transport.write(data)
        if not more_body:
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()

    def _flush(self) -> None:
        """The loop's next turn: a head still held (no body came with it) goes out alone."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self.disconnected and not self.transport.is_closing():
                self.transport.write(held)
