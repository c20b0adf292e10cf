"""A client's leaving is heard while its request is in flight: the server protocol keeps
reading the connection (a reset or a close waits in the kernel until the next read) and tells
the request that runs. Fed bytes with a mock transport, as uvicorn's tests do; then over
loopback against the fake backend, which counts the aborts it sees."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway.interrupt import CLIENT_GONE
from gateway.server import GuardedHttpToolsProtocol, guarded_protocol
from gateway.types import Receive, Scope, Send
from tests.gateway.test_server import Transport
from tests.helpers import wait_until
from tests.servers import FakeBackend, GatewayServer, gateway_settings


class ReadTransport(Transport):
    """The mock transport, and whether it is being read."""

    reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Waiting:
    """Reads the whole body, then waits for ever (a generation that takes its time); keeps
    each request's scope."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        while (await receive()).get("more_body"):
            pass
        await asyncio.Event().wait()


class Echo:
    """Answers each request with its path."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.sleep(0.01)
        path = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": path})


def connected(app: Any) -> tuple[GuardedHttpToolsProtocol, ReadTransport]:
    cls = guarded_protocol(1 << 20, 60.0)
    config = uvicorn.Config(app, http=cls, lifespan="off", log_config=None)
    config.load()
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = ReadTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    assert isinstance(protocol, GuardedHttpToolsProtocol)
    return protocol, transport


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode()


def cancel_the_rest() -> None:
    for task in asyncio.all_tasks() - {asyncio.current_task()}:
        task.cancel()


async def test_a_request_queued_behind_another_leaves_the_connection_read() -> None:
    protocol, transport = connected(Waiting())
    protocol.data_received(get("/first"))
    await asyncio.sleep(0)  # it has its request and works on it, reading no more
    protocol.data_received(get("/queued"))
    assert transport.reading  # uvicorn stops reading here: a reset would go unheard
    cancel_the_rest()


async def test_a_reset_behind_a_queued_request_tells_the_request_that_runs() -> None:
    app, told = Waiting(), []
    protocol, _ = connected(app)
    protocol.data_received(get("/first") + get("/queued"))
    await asyncio.sleep(0)
    (running,) = app.scopes  # the queued one waits for its turn
    running["extensions"][CLIENT_GONE].callback = lambda: told.append(running["path"])
    protocol.connection_lost(ConnectionResetError())
    assert told == ["/first"]
    cancel_the_rest()


async def test_requests_pipelined_behind_a_queued_one_are_answered_in_order() -> None:
    protocol, transport = connected(Echo())
    protocol.data_received(get("/a") + get("/b"))
    protocol.data_received(get("/c"))  # held while /b waits for its turn
    await wait_for(lambda: transport.buffer.count(b"HTTP/1.1 200") == 3)
    assert re.findall(rb"\r\n(/[abc])\r\n", transport.buffer) == [b"/a", b"/b", b"/c"]


async def test_a_body_over_64_kib_once_complete_leaves_the_connection_read() -> None:
    """uvicorn stops reading at 64 KiB of body until the app asks for more; the relay asks
    no more once the body is in."""
    protocol, transport = connected(Waiting())
    body = b"x" * 100_000
    protocol.data_received(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    await asyncio.sleep(0)  # the app waits for the body
    protocol.data_received(body)
    await asyncio.sleep(0)  # it has it all, and waits
    assert transport.reading
    cancel_the_rest()


async def wait_for(condition: Any) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.servers
@pytest.mark.parametrize("leaving", ["close", "reset"])
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_a_client_leaving_with_a_request_queued_aborts_the_backend(
    fake: FakeBackend, leaving: str, stream: bool
) -> None:
    """The backend never answers (or streams slowly), so only the client's leaving can
    reach it; before, the gateway stopped reading and heard nothing."""
    settings = gateway_settings(
        [{"name": fake.name, "url": fake.url}], timeouts={"first_byte": 600, "idle": 600}
    )
    gateway = GatewayServer(settings)
    try:
        fakes: dict[str, Any] = {"hang_after": 1} if stream else {"hang": True}
        doc = {"model": fake.name, "messages": [], "stream": stream, "fake": fakes}
        body = json.dumps(doc).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s"
        )
        client = socket.create_connection(("127.0.0.1", gateway.port))
        client.sendall(request % (len(body), body) * 2)
        wait_until(lambda: fake.stats()["started"] == 1, 10, "the backend to start")
        if leaving == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_until(lambda: fake.stats()["aborted"] == 1, 5, "the backend to see the abort")
        assert fake.stats()["started"] == 1  # the queued request never went
    finally:
        gateway.close()
