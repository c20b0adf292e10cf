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
        self.writes: list[bytes] = []  # each write: a system call on a real socket
        self.closed = False

    def get_extra_info(self, name: str) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name)

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.writes.append(data)

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


class Scripted:
    """Sends the given ASGI messages; ``pause`` between two of them lets the loop turn."""

    def __init__(self, *messages: dict[str, Any] | str) -> None:
        self.messages = messages

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for message in self.messages:
            if message == "pause":
                await asyncio.sleep(0.01)
            else:
                await send(message)  # type: ignore[arg-type]


def start(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http.response.start", "status": 200, "headers": list(headers)}


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


GET = b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n"


async def answer(app: Scripted, request: bytes = GET) -> Transport:
    protocol, transport = connected(app)  # type: ignore[arg-type]
    protocol.data_received(request)
    for _ in range(5):
        await asyncio.sleep(0.01)
    return transport


async def test_a_head_and_the_body_sent_with_it_go_out_in_one_write() -> None:
    app = Scripted(start((b"content-length", b"2")), body(b"ok"))
    transport = await answer(app)
    (write,) = transport.writes
    assert write.startswith(b"HTTP/1.1 200 OK\r\n") and write.endswith(
        b"content-length: 2\r\n\r\nok"
    )


async def test_a_head_with_no_body_behind_it_goes_out_on_the_loops_next_turn() -> None:
    """A stream waiting for its first token: the client has its headers at once."""
    app = Scripted(start((b"content-type", b"text/event-stream")), "pause", body(b"data: 1\n\n"))
    protocol, transport = connected(app)  # type: ignore[arg-type]
    protocol.data_received(GET)
    for _ in range(3):
        await asyncio.sleep(0)  # the app's task starts and sends the head; the loop turns
    assert transport.writes and transport.writes[0].endswith(b"transfer-encoding: chunked\r\n\r\n")
    await asyncio.sleep(0.05)
    assert transport.writes[1:] == [b"9\r\ndata: 1\n\n\r\n0\r\n\r\n"]


async def test_a_chunked_body_keeps_its_framing_and_ends_with_its_last_chunk() -> None:
    app = Scripted(start(), body(b"ab", more=True), body(b"cde"))
    transport = await answer(app)
    head, rest = transport.buffer.split(b"\r\n\r\n", 1)
    assert b"transfer-encoding: chunked" in head
    assert rest == b"2\r\nab\r\n3\r\ncde\r\n0\r\n\r\n"
    assert len(transport.writes) == 2  # the head went with the first chunk


async def test_a_head_request_gets_the_head_alone() -> None:
    app = Scripted(start((b"content-length", b"2")), body(b"ok"))
    transport = await answer(app, b"HEAD /x HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert transport.buffer.endswith(b"content-length: 2\r\n\r\n")


async def test_connection_close_from_the_app_closes_after_the_one_write() -> None:
    app = Scripted(start((b"connection", b"close"), (b"content-length", b"2")), body(b"ok"))
    transport = await answer(app)
    assert len(transport.writes) == 1 and transport.buffer.endswith(b"ok") and transport.closed


async def test_a_header_value_with_a_line_break_is_never_written() -> None:
    app = Scripted(start((b"x-evil", b"a\r\nset-cookie: b")), body(b"ok"))
    transport = await answer(app)
    assert transport.buffer == b"" and transport.closed  # as uvicorn: the connection drops


async def test_a_kept_alive_connection_idle_too_long_is_closed_by_the_sweep() -> None:
    """uvicorn's keep-alive timer, without a timer armed and cancelled per response."""
    protocol, transport = connected(App())
    protocol.data_received(GET)
    await asyncio.sleep(0.01)
    assert b"ok" in transport.buffer and protocol.timeout_keep_alive_task is None
    now = asyncio.get_running_loop().time()
    protocol.check_reading(now + protocol.timeout_keep_alive - 1)
    assert not transport.closed
    protocol.check_reading(now + protocol.timeout_keep_alive + 0.1)
    assert transport.closed


async def test_a_new_request_on_a_kept_alive_connection_is_not_idle() -> None:
    protocol, transport = connected(App(wait=True))
    protocol.data_received(GET)
    await asyncio.sleep(0.01)  # no answer: the app waits
    protocol.check_reading(asyncio.get_running_loop().time() + protocol.timeout_keep_alive + 1)
    assert not transport.closed
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()
