"""The bad-input matrix: every malformed or hostile request gets a documented 4xx in OpenAI's
shape, nothing of it reaches a backend, and the gateway serves normally afterwards.

Over real sockets. The protocol's clock (a request trickling in for too long) is shown fed
bytes, without waiting, in test_server.py."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.servers import FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEY = "sk-matrix"
CHAT = "/v1/chat/completions"
LIMIT = 64 * 1024
HEADERS = "request_header_fields_too_large"


@dataclass
class Answer:
    status: int
    error: dict[str, object]


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend("fake-chat")
    yield fake
    fake.close()


@pytest.fixture(scope="module")
def gateway(backend: FakeBackend) -> Iterator[GatewayServer]:
    settings = gateway_settings(
        [{"name": backend.name, "url": backend.url}],
        api_keys=[KEY],
        max_body_bytes=LIMIT,
        max_head_bytes=8192,
        timeouts={"client": 1.0},
    )
    server = GatewayServer(settings)
    yield server
    server.close()


def post(body: bytes | None = None, content_type: str = "application/json", **kw: object):
    def send(gw: GatewayServer) -> Answer:
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": content_type}
        response = httpx.post(gw.url + str(kw.get("path", CHAT)), content=body, headers=headers)
        return Answer(response.status_code, response.json()["error"])

    return send


def model(value: object) -> Callable[[GatewayServer], Answer]:
    return post(json.dumps({"model": value, "messages": []}).encode())


def raw(data: bytes, then: bytes = b"", pause: float = 0.0):
    """Bytes on a socket as a client would send them, for what httpx will not send."""

    def send(gw: GatewayServer) -> Answer:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(data)
            for byte in then:  # a trickle: one byte per pause
                time.sleep(pause)
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break  # refused mid-trickle: the answer is waiting
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        head, _, body = response.partition(b"\r\n\r\n")
        return Answer(int(head.split()[1]), json.loads(body)["error"])

    return send


def head(method: str, path: str, *headers: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gw", f"Authorization: Bearer {KEY}", *headers]
    if length is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {length}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


MULTIPART = "multipart/form-data; boundary=XyZ"
FILE_ONLY = (
    b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\r\n'
    b"--XyZ--\r\n"
)

CASES: dict[str, tuple[Callable[[GatewayServer], Answer], int, str | None]] = {
    "malformed JSON": (post(b'{"model": '), 400, "invalid_json"),
    "JSON that is not an object": (post(b'["fake-chat"]'), 400, "invalid_body"),
    "model missing": (post(b'{"messages": []}'), 400, "invalid_model"),
    "model null": (model(None), 400, "invalid_model"),
    "model a number": (model(7), 400, "invalid_model"),
    "model a list": (model(["fake-chat"]), 400, "invalid_model"),
    "model empty": (model(""), 400, "invalid_model"),
    "model 10 KB long": (model("m" * 10_000), 400, "invalid_model"),
    "model with a slash": (model("fake-chat/../admin"), 404, "model_not_found"),
    "model ..": (model(".."), 404, "model_not_found"),
    "model %2e%2e": (model("%2e%2e/fake-chat"), 404, "model_not_found"),
    "model with NUL": (model("fake-chat\x00"), 400, "invalid_model"),
    "empty body": (post(b""), 400, "invalid_json"),
    "wrong content type": (post(b"model=fake-chat", "text/plain"), 415, "unsupported_media_type"),
    "invalid UTF-8": (post(b'{"model": "fake-\xff\xfe"}'), 400, "invalid_json"),
    "body over the limit": (post(b"x" * (LIMIT + 1)), 413, "payload_too_large"),
    "body over the limit, announced": (
        raw(head("POST", CHAT, length=10**9)),  # refused on its head: no byte of body read
        413,
        "payload_too_large",
    ),
    "body over the limit, chunked": (
        raw(
            head("POST", CHAT, "Content-Type: application/json", "Transfer-Encoding: chunked")
            + b"%x\r\n" % (LIMIT + 1)
            + b"x" * (LIMIT + 1)
        ),
        413,
        "payload_too_large",
    ),
    "client stops sending half-way": (
        raw(head("POST", CHAT, length=100) + b'{"model": "fake-'),
        408,
        "request_timeout",
    ),
    "unknown path": (post(b"{}", path="/v1/nowhere"), 404, "not_found"),
    "path traversal": (post(b"{}", path="/v1/../../etc/passwd"), 404, "not_found"),
    "wrong method": (raw(head("GET", CHAT)), 405, "method_not_allowed"),
    "wrong method on the control API": (
        raw(head("DELETE", "/v1/models")),
        405,
        "method_not_allowed",
    ),
    "oversized headers": (raw(head("GET", "/health", "X-Big: " + "a" * 20_000)), 431, HEADERS),
    "many headers": (
        raw(head("GET", "/health", *[f"X-{i}: v" for i in range(2000)])),
        431,
        HEADERS,
    ),
    "multipart without a model": (
        post(FILE_ONLY, MULTIPART, path="/v1/audio/transcriptions"),
        400,
        "invalid_model",
    ),
    "multipart without a boundary": (
        post(FILE_ONLY, "multipart/form-data", path="/v1/audio/transcriptions"),
        415,
        "unsupported_media_type",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_4xx(
    gateway: GatewayServer, backend: FakeBackend, case: str
) -> None:
    send, status, code = CASES[case]
    before = backend.stats()["started"]
    answer = send(gateway)
    assert answer.status == status
    assert set(answer.error) == {"message", "type", "param", "code"}
    assert answer.error["message"]
    if code is not None:
        assert answer.error["code"] == code
    assert backend.stats()["started"] == before  # nothing reached the backend
    still = httpx.post(
        gateway.url + CHAT,
        json={"model": backend.name, "messages": []},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert still.status_code == 200
