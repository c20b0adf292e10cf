"""The HTTP server: uvicorn with its httptools protocol, plus two limits uvicorn lacks.

uvicorn's httptools protocol accepts request heads of any size (megabytes of headers are
buffered) and waits for ever for a head that never completes. Both let one client hold memory
or connections without end, so the protocol here refuses a head over ``max_head_bytes`` with
431 and one that is not complete after ``head_timeout`` seconds with 408 (a connection that
never sent a byte is just closed). The body has its own bounds in ``gateway.request``.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.errors import GatewayError, HeadersTooLarge, RequestTimeout, raw_response
from gateway.settings import GatewaySettings
from gateway.types import ASGIApp


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes: ClassVar[int] = 64 * 1024
    head_timeout: ClassVar[float] = 60.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = self._parsed_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: GatewayError | None = None
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._head_timer is not None and self._head_bytes > self.max_head_bytes:
            self._refuse(self._head_too_large())  # a head that is still arriving

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

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

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:
            self._start_head()

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def _start_head(self) -> None:
        self._head_bytes = self._parsed_bytes = 0
        self._refusal = None
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._head_bytes == 0:
            self.transport.close()  # an idle connection that never asked anything
            return
        self._refuse(
            RequestTimeout(f"The request head did not arrive within {self.head_timeout:g} seconds.")
        )

    def _refuse(self, error: GatewayError) -> None:
        self._stop_head_timer()
        if not self.transport.is_closing():
            self.transport.write(raw_response(error))
            self.transport.close()


class _Refused(Exception):
    pass


def guarded_protocol(max_head_bytes: int, head_timeout: float) -> type[HttpToolsProtocol]:
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout},
    )


def uvicorn_config(app: ASGIApp, settings: GatewaySettings, **overrides: Any) -> uvicorn.Config:
    """The one place uvicorn is configured, for the CLI and for tests alike."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "loop": "auto",
        "http": guarded_protocol(settings.max_header_bytes, settings.timeouts.client),
        "server_header": False,
        "log_config": None,  # logging is set up once, by gateway.logs
        "access_log": False,  # the gateway writes its own, with model, key name and tokens
        "timeout_graceful_shutdown": 30,
        **overrides,
    }
    return uvicorn.Config(app, **options)
