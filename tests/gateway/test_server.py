"""The server protocol's own limits, fed bytes directly (as uvicorn's tests do): no socket, no
sleep. The bad-input matrix (test_bad_input.py) shows the same answers over real sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from gateway.interrupt import CLIENT_GONE
from gateway.server import GuardedHttpToolsProtocol, guarded_protocol
from gateway.types import Receive, Scope, Send

HEAD_LIMIT, READ_TIMEOUT = 1024, 5.0


class Transport:
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self) -> None:
        self.buffer = b""
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: bytes) -> None:
        self.buffer += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, *args: Any, **kwargs: Any) -> None:
        pass


class App:
    """Answers 200, or waits for ever; keeps the scopes it saw."""

    def __init__(self, wait: bool = False) -> None:
        self.wait = wait
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if self.wait:
            await asyncio.Event().wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def connected(app: App) -> tuple[GuardedHttpToolsProtocol, Transport]:
    cls = guarded_protocol(HEAD_LIMIT, READ_TIMEOUT)
    config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    assert isinstance(protocol, GuardedHttpToolsProtocol)
    return protocol, transport


async def test_a_head_over_the_limit_in_one_read_is_refused_431() -> None:
    protocol, transport = connected(App())
    protocol.data_received(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert transport.buffer.startswith(b"HTTP/1.1 431 ")
    assert b'"request_header_fields_too_large"' in transport.buffer and transport.closed


async def test_a_head_growing_past_the_limit_is_refused_before_it_ends() -> None:
    protocol, transport = connected(App())
    protocol.data_received(b"GET /health HTTP/1.1\r\n")
    for _ in range(40):
        if transport.closed:
            break
        protocol.data_received(b"X-Piece: " + b"a" * 50 + b"\r\n")  # never a blank line
    assert transport.buffer.startswith(b"HTTP/1.1 431 ") and transport.closed


async def test_a_request_that_takes_too_long_to_arrive_is_refused_408() -> None:
    protocol, transport = connected(App())
    began = asyncio.get_running_loop().time()
    protocol.data_received(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{")
    protocol.check_reading(began + READ_TIMEOUT / 2)  # slow, not yet too slow
    assert transport.buffer == b""
    protocol.data_received(b'"model"')  # a trickle does not restart the clock
    protocol.check_reading(began + READ_TIMEOUT + 0.1)
    assert transport.buffer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in (
        transport.buffer
    )


async def test_an_idle_connection_is_closed_without_an_answer() -> None:
    protocol, transport = connected(App())
    protocol.check_reading(asyncio.get_running_loop().time() + READ_TIMEOUT + 0.1)
    assert transport.closed and transport.buffer == b""


async def test_shutdown_tells_a_request_still_waiting_and_leaves_answered_ones_alone() -> None:
    told: list[str] = []
    for app, label in ((App(wait=True), "waiting"), (App(), "answered")):
        protocol, _ = connected(app)
        protocol.data_received(b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        await asyncio.sleep(0)  # the app runs: it waits, or it answers
        (scope,) = app.scopes
        scope["extensions"][CLIENT_GONE].on_closing = lambda label=label: told.append(label)
        protocol.shutdown()
    assert told == ["waiting"]
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()
