"""The HTTP server: uvicorn with its httptools protocol, plus two limits uvicorn lacks.

uvicorn's httptools protocol accepts request heads of any size (megabytes of headers are
buffered) and waits for ever for a request that never completes. Both let one client hold
memory or connections without end, so the protocol here refuses a head over
``max_head_bytes`` with 431 and a request (head and body) not complete after ``read_timeout``
seconds with 408 (a connection that never sent a byte is just closed). The body's size is
bounded in ``gateway.request``. It also tells the relay when a client leaves mid-request
(``gateway.interrupt``).

A client's leaving is heard only while its connection is read: a reset or a close waits in
the kernel until the next read or write, and for a non-stream answer the next write comes when
the generation is over. uvicorn stops reading in two cases: a request body over 64 KiB
(until the app asks for more, which the relay no longer does once the body is in) and a
pipelined request (until the one before it is answered; then it also marked only the queued
request as gone, never the one running). Here reading goes on: a body that is complete resumes
it, and bytes behind a queued request are held, unparsed, up to ``HELD_LIMIT``.
"""

from __future__ import annotations

import asyncio
import gc
from collections import deque
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from gateway.coalescing import CoalescingCycle
from gateway.errors import GatewayError, HeadersTooLarge, RequestTimeout, raw_response
from gateway.interrupt import CLIENT_GONE, ClientGone
from gateway.settings import GatewaySettings
from gateway.sweeper import Sweeper
from gateway.types import ASGIApp

HELD_LIMIT = 1 << 16  # bytes behind a queued pipelined request read before reading stops


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """Made by ``guarded_protocol``, which gives each server its limits and its own sweeper."""

    max_head_bytes: ClassVar[int]
    read_timeout: ClassVar[float]
    reads: ClassVar[Sweeper[GuardedHttpToolsProtocol]]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = self._parsed_bytes = 0
        self._in_head = True
        self._refusal: GatewayError | None = None
        # The requests not answered yet, the running one first, each with what tells its relay.
        self._open: deque[tuple[RequestResponseCycle, ClientGone]] = deque()
        self._held = bytearray()  # read behind a queued pipelined request, not yet parsed
        self.reading_since: float | None = self.loop.time()
        self.idle_since: float | None = None  # a kept-alive connection waiting for a request
        self.reads.add(self, self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        self.reads.discard(self, self.loop)
        super().connection_lost(exc)  # marks only the newest request (a queued one) as gone
        for cycle, gone in self._open:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
                gone.notify()
        self._open.clear()
        self._held.clear()

    def shutdown(self) -> None:
        """The server begins to shut down: a request still waiting for a model start is told
        (``gateway.interrupt``); the rest finish as uvicorn lets them."""
        for cycle, gone in self._open:
            if not cycle.response_started:
                gone.closing()
        super().shutdown()

    def data_received(self, data: bytes) -> None:
        self.idle_since = None
        if self.pipeline:  # a request waits for the one before it: parsed when that is done
            self._held += data
            if len(self._held) > HELD_LIMIT:
                self.flow.pause_reading()  # a client that floods pipelined requests
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(self._head_too_large())  # a head that is still arriving

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._parsed_bytes = 0
        self._in_head, self._refusal = True, None
        if self.reading_since is None:
            self.reading_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        # Tells the relay when its client leaves, instead of a task per request that waits on
        # `receive` for the disconnect.
        gone = ClientGone()
        extensions: dict[str, Any] = self.scope.setdefault("extensions", {})
        extensions[CLIENT_GONE] = gone
        super().on_headers_complete()
        if type(self.cycle) is RequestResponseCycle:
            # uvicorn makes its cycle by name; this one holds the head for the first body
            # write (gateway.coalescing). Its task has not run yet, so every send is ours.
            self.cycle.__class__ = CoalescingCycle
        if self.cycle is not None and self.cycle.scope is self.scope:  # not an upgrade
            self._open.append((self.cycle, gone))
        if self.pipeline:
            self.flow.resume_reading()  # uvicorn stopped reading; bytes behind it are held

    def on_message_complete(self) -> None:
        self.reading_since = None  # the whole request is in: no more reading to time
        super().on_message_complete()
        # uvicorn stops reading at 64 KiB of body until the app asks for more; a body that is
        # complete needs no more asking, and the connection must stay read to hear a reset.
        self.flow.resume_reading()

    def on_response_complete(self) -> None:
        """uvicorn arms a keep-alive timer here, per response, and cancels it when the next
        request comes; here the time is written down and the sweeper closes a connection idle
        for longer than `timeout_keep_alive` (``check_reading``)."""
        while self._open and self._open[0][0].response_complete:
            self._open.popleft()
        if self.pipeline or self.transport.is_closing():
            super().on_response_complete()  # a pipelined request starts, uvicorn's way
            if not self.pipeline and self._held and not self.transport.is_closing():
                held = bytes(self._held)
                self._held.clear()
                self.data_received(held)  # what came behind it, in order
            return
        self.server_state.total_requests += 1
        self.flow.resume_reading()
        self.idle_since = self.loop.time()

    def _count(self, size: int) -> None:
        """Exact head size, for a head that arrived whole in one read."""
        self._parsed_bytes += size
        if self._parsed_bytes > self.max_head_bytes:
            self._refusal = self._head_too_large()
            raise _Refused  # the parser stops; uvicorn then calls send_400_response

    def send_400_response(self, msg: str) -> None:
        if self._refusal is not None:
            self._refuse(self._refusal)
        else:
            super().send_400_response(msg)

    def _head_too_large(self) -> GatewayError:
        return HeadersTooLarge(
            f"The request head is larger than this gateway's limit of {self.max_head_bytes} bytes."
        )

    def check_reading(self, now: float) -> None:
        if self.reading_since is not None and now - self.reading_since > self.read_timeout:
            self.timed_out()
        elif self.idle_since is not None and now - self.idle_since > self.timeout_keep_alive:
            self.idle_since = None
            self.timeout_keep_alive_handler()  # what uvicorn's own timer would call

    def timed_out(self) -> None:
        """The request (head and body) has been arriving for longer than read_timeout."""
        self.reading_since = None
        if self._head_bytes == 0 and self._in_head:
            self.transport.close()  # an idle connection that never asked anything
            return
        if self.cycle is not None and self.cycle.response_started:
            return  # the application answered already; nothing to refuse
        self._refuse(
            RequestTimeout(f"The request did not arrive within {self.read_timeout:g} seconds.")
        )

    def _refuse(self, error: GatewayError) -> None:
        self.reading_since = None
        if not self.transport.is_closing():
            self.transport.write(raw_response(error))
            self.transport.close()


class _Refused(Exception):
    pass


def guarded_protocol(max_head_bytes: int, read_timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class of one server. No timer per request: the time a request began (or a
    kept-alive connection went idle) is written down, and the class's sweeper looks a few times
    a second for requests that have been arriving, or connections idle, for too long."""
    reads: Sweeper[GuardedHttpToolsProtocol] = Sweeper(GuardedHttpToolsProtocol.check_reading)
    reads.at_most_every(read_timeout)
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "read_timeout": read_timeout, "reads": reads},
    )


def tune_gc() -> None:
    """Fewer, cheaper garbage collections (load/bench.py shows what it is worth).

    Every request leaves short-lived objects behind, and CPython's default gen-0 threshold
    (700) then runs collections thousands of times a second, each also walking the long-lived
    objects of the app (its modules, the metrics registry). Freezing what exists at start-up
    takes those out of every collection, and a larger gen-0 threshold makes collections rarer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 100)


def uvicorn_config(app: ASGIApp, settings: GatewaySettings, **overrides: Any) -> uvicorn.Config:
    """The one place uvicorn is configured, for the CLI and for tests alike."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "loop": "auto",
        "http": guarded_protocol(settings.max_head_bytes, settings.timeouts.client),
        "server_header": False,
        "proxy_headers": False,  # the gateway reads no client address: skip the parsing
        "log_config": None,  # logging is set up once, by gateway.logs
        "access_log": False,  # the gateway writes its own, with model, key name and tokens
        "timeout_graceful_shutdown": 30,
        **overrides,
    }
    return uvicorn.Config(app, **options)
