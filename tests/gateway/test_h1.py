"""The relay's HTTP/1.1 client against servers that answer with exactly the bytes a test gives:
the cases a hand-written client gets wrong, one test each."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.h1 import ClosedEarly, ClosedMidBody, ConnectFailed, Malformed, Pool
from gateway.upstream import translate
from tests.helpers import until

Answer = Callable[[int, bytes], list[bytes | float | None]]  # (request no., request) -> script


class Scripted:
    """A server that reads each request whole, then plays its script: bytes are written, a
    float is a pause (that ends early when the client closes), None closes the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[bytes] = []
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self.hung_up = asyncio.Event()  # the script closed a connection (None)

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                for step in self.answer(len(self.requests), request):
                    if step is None:
                        writer.close()
                        self.hung_up.set()
                        return
                    if isinstance(step, float):  # a pause that notices the client leave
                        try:
                            if not await asyncio.wait_for(reader.read(1), step):
                                self.closed_by_client.set()
                                return
                        except TimeoutError:
                            pass
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()


Serve = Callable[..., Awaitable[tuple["Scripted", Pool]]]  # (answer, **pool arguments)


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    started: list[tuple[Scripted, Pool]] = []

    async def start(answer: Answer, **pool_args: object) -> tuple[Scripted, Pool]:
        server = Scripted(answer)
        url = await server.start(pool_args.pop("server_ssl", None))  # type: ignore[arg-type]
        pool = Pool(url, **pool_args)  # type: ignore[arg-type]
        started.append((server, pool))
        return server, pool

    yield start
    for server, pool in started:
        pool.close()
        server.close()


def always(*script: bytes | float | None) -> Answer:
    return lambda n, request: list(script)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: application/json\r\n\r\nhello"


async def test_the_request_goes_out_as_one_head_with_host_length_and_headers(serve: Serve) -> None:
    server, pool = await serve(always(OK))
    response = await pool.request("POST", "/v1/x?a=1", [(b"X-Request-Id", b"r1")], b'{"m":1}')
    assert response.status == 200 and await response.read() == b"hello"
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/x?a=1 HTTP/1.1"
    assert lines[1] == b"Host: %s" % pool.authority
    assert b"X-Request-Id: r1" in lines and b"Content-Length: 7" in lines
    assert body == b'{"m":1}'
    assert response.content_type == "application/json"


CLOSE = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"


@pytest.mark.parametrize(("reply", "connections"), [(OK, 1), (CLOSE, 3)])
async def test_a_connection_is_kept_unless_the_server_says_close(
    serve: Serve, reply: bytes, connections: int
) -> None:
    server, pool = await serve(always(reply))
    for _ in range(3):
        response = await pool.request("POST", "/", [], b"{}")
        assert await response.read() == b"hello"
        response.release()
    assert server.connections == connections


async def test_a_chunked_body_arrives_chunk_by_chunk_as_sent(serve: Serve) -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    )
    server, pool = await serve(always(head, b"6\r\ndata:1\r\n", 0.3, b"6\r\ndata:2\r\n0\r\n\r\n"))
    response = await pool.request("POST", "/", [], b"{}")
    first = await asyncio.wait_for(response.readany(), 0.2)  # before the pause ends
    assert first == b"data:1"
    assert await response.readany() == b"data:2"
    assert await response.readany() == b""
    response.release()
    await (await pool.request("POST", "/", [], b"{}")).read()
    assert server.connections == 1  # a chunked body that ended cleanly keeps its connection


async def test_a_close_delimited_body_ends_with_the_connection(serve: Serve) -> None:
    server, pool = await serve(always(b"HTTP/1.1 200 OK\r\n\r\nall of ", b"it", None))
    response = await pool.request("GET", "/", [])
    assert await response.read() == b"all of it"
    response.release()
    await (await pool.request("GET", "/", [])).read()
    assert server.connections == 2  # not reused: it is gone


async def test_an_idle_connection_the_server_closed_is_retried_on_a_fresh_one(serve: Serve) -> None:
    server, pool = await serve(lambda n, request: [OK, None])  # answers, then hangs up
    await (await pool.request("POST", "/", [], b"{}")).read()
    await asyncio.wait_for(server.hung_up.wait(), 2)
    response = await pool.request("POST", "/", [], b"{}")
    assert await response.read() == b"hello"
    assert server.connections == 2 and len(server.requests) == 2


async def test_bytes_nobody_asked_for_are_never_taken_for_the_next_answer(serve: Serve) -> None:
    evil = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nevil!"
    server, pool = await serve(always(OK, 0.05, evil))  # sent while the connection is idle
    response = await pool.request("POST", "/", [], b"{}")
    assert await response.read() == b"hello"
    response.release()
    await until(lambda: all(c.closed for c in pool.idle), 2, "the stray answer to drop it")
    again = await pool.request("POST", "/", [], b"{}")
    assert await again.read() == b"hello"
    assert server.connections == 2  # the first one was dropped when the stray answer came


async def test_a_reused_connection_reset_after_response_bytes_is_not_retried(serve: Serve) -> None:
    broken = b"HTTP/1.1 200 OK\r\nContent-Len"
    server, pool = await serve(lambda n, request: [OK] if n == 1 else [broken, None])
    response = await pool.request("POST", "/", [], b"{}")
    await response.read()
    response.release()
    with pytest.raises(ClosedEarly) as info:
        await pool.request("POST", "/", [], b"{}")
    assert info.value.got_bytes
    assert len(server.requests) == 2  # sent once: the backend may have acted on it
    assert translate(info.value, "m").status == 503


async def test_interim_1xx_responses_are_skipped(serve: Serve) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    _server, pool = await serve(always(interim, OK))
    response = await pool.request("POST", "/", [], b"{}")
    assert response.status == 200 and await response.read() == b"hello"
    assert (b"Link", b"</a>") not in response.raw_headers


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_end_at_their_head_and_keep_the_connection(
    serve: Serve, status: int
) -> None:
    reply = b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\n\r\n" % status
    server, pool = await serve(always(reply))
    for _ in range(2):
        response = await pool.request("GET", "/", [])
        assert response.status == status and await response.read() == b""
        response.release()
    assert server.connections == 1


async def test_a_header_line_of_64_kib_is_read_whole(serve: Serve) -> None:
    value = b"v" * (64 * 1024)
    _server, pool = await serve(
        always(b"HTTP/1.1 200 OK\r\nX-Big: %s\r\nContent-Length: 0\r\n\r\n" % value)
    )
    response = await pool.request("GET", "/", [])
    assert (b"X-Big", value) in response.raw_headers


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 OK\r\n\r\n",  # no status code
        b"HTPT/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",  # no colon
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    ],
)
async def test_malformed_responses_are_a_502(serve: Serve, reply: bytes) -> None:
    _server, pool = await serve(always(reply))
    with pytest.raises(Malformed) as info:
        await pool.request("GET", "/", [])
    error = translate(info.value, "m")
    assert error.status == 502 and "malformed" in error.message


async def test_a_backend_that_stops_mid_chunk_fails_the_read_after_what_came(serve: Serve) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    _server, pool = await serve(always(head, b"6\r\ndata:1\r\n", b"10\r\nhalf", None))
    response = await pool.request("POST", "/", [], b"{}")
    received = b""
    with pytest.raises(ClosedMidBody) as info:
        while chunk := await response.readany():
            received += chunk
    assert received.startswith(b"data:1")
    assert translate(info.value, "m", started=True).status == 502


async def test_a_short_content_length_body_is_an_error_not_an_end(serve: Serve) -> None:
    _server, pool = await serve(always(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf", None))
    response = await pool.request("GET", "/", [])
    with pytest.raises(ClosedMidBody):
        await response.read()


async def test_refused_is_connect_failed_and_a_503() -> None:
    pool = Pool("http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConnectFailed) as info:
        await pool.request("GET", "/", [])
    assert translate(info.value, "m").status == 503


async def test_a_connect_timeout_is_connect_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(*args: object, **kwargs: object) -> None:
        await asyncio.sleep(3600)

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", never)
    pool = Pool("http://127.0.0.1:9", connect_timeout=0.05)
    with pytest.raises(ConnectFailed, match="connect timeout"):
        await pool.request("GET", "/", [])


async def test_cancelling_a_request_drops_its_connection(serve: Serve) -> None:
    server, pool = await serve(always(3600.0))
    task = asyncio.create_task(pool.request("POST", "/", [], b"{}"))
    await until(lambda: len(server.requests) == 1, 2, "the request at the server")
    task.cancel()
    await asyncio.wait_for(server.closed_by_client.wait(), 2)  # the backend sees it go


async def test_closing_an_unfinished_response_drops_its_connection(serve: Serve) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    server, pool = await serve(always(head, b"6\r\ndata:1\r\n", 3600.0))
    response = await pool.request("POST", "/", [], b"{}")
    assert await response.readany() == b"data:1"
    response.close()
    await asyncio.wait_for(server.closed_by_client.wait(), 2)
    assert not pool.idle


async def test_a_slow_reader_pauses_the_connection_and_loses_nothing(serve: Serve) -> None:
    body = bytes(range(256)) * 16 * 1024  # 4 MiB, past the high-water mark
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    _server, pool = await serve(always(reply, body))
    response = await pool.request("GET", "/", [])
    transport = response._conn.transport
    assert transport is not None
    await until(lambda: not transport.is_reading(), 5, "the client to stop reading")
    assert await response.read() == body


async def test_unix_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "vllm.sock")

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()

    server = await asyncio.start_unix_server(answer, path)
    pool = Pool("http://localhost", uds=path)
    response = await pool.request("GET", "/health", [])
    assert await response.read() == b"hello"
    pool.close()
    server.close()


async def test_https_with_the_backends_certificate(serve: Serve, tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    _server, pool = await serve(always(OK), server_ssl=server_side, ssl_context=trusting)
    response = await pool.request("POST", "/", [], b"{}")
    assert await response.read() == b"hello"
    untrusting = Pool(pool_url(pool))
    with pytest.raises(ConnectFailed):  # an unknown certificate is refused
        await untrusting.request("POST", "/", [], b"{}")


def pool_url(pool: Pool) -> str:
    return f"https://{pool.host}:{pool.port}"
