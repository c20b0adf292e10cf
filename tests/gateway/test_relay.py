"""The relay over real loopback sockets: a real uvicorn gateway in front of the fake backend.

The fake provokes what a real vLLM cannot be made to do on demand: hang mid-stream, die
mid-stream, never answer. Correctness against real vLLM is in tests/integration.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import wait_until
from tests.servers import FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEY = {"Authorization": "Bearer sk-client"}


@pytest.fixture
def gateway(fake: FakeBackend) -> Iterator[GatewayServer]:
    models = [{"name": fake.name, "aliases": ["chat"], "url": fake.url}]
    server = GatewayServer(
        gateway_settings(models, api_keys=["sk-client"], timeouts={"first_byte": 2, "idle": 1})
    )
    yield server
    server.close()


def chat(stream: bool = False, model: str = "fake-chat", **fake: object) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        "fake": fake,
    }


def events(text: str) -> list[str]:
    return [e for e in text.split("\n\n") if e]


def test_response_bytes_are_the_backends(gateway: GatewayServer, fake: FakeBackend) -> None:
    via = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=KEY)
    direct = httpx.post(f"{fake.url}/v1/chat/completions", json=chat())
    assert via.status_code == 200
    assert via.headers["content-type"] == direct.headers["content-type"]
    strip = lambda r: {k: v for k, v in r.json().items() if k != "created"}  # noqa: E731
    assert strip(via) == strip(direct)


def test_stream_events_are_relayed_unchanged(gateway: GatewayServer, fake: FakeBackend) -> None:
    """Byte for byte: the fake's stream is deterministic but for the `created` time."""
    bodies = []
    for url, headers in ((gateway.url, KEY), (fake.url, {})):
        with httpx.stream(
            "POST", f"{url}/v1/chat/completions", json=chat(True), headers=headers
        ) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            bodies.append(re.sub(rb'"created":\d+', b'"created":0', response.read()))
    via, direct = bodies
    assert via == direct
    assert len(events(via.decode())) == 9 and via.endswith(b"data: [DONE]\n\n")


def test_events_reach_the_client_while_the_backend_is_still_generating(
    gateway: GatewayServer, fake: FakeBackend
) -> None:
    """No buffering: two events arrive although the backend then stays silent for an hour."""
    request = chat(True, hang_after=2)
    with httpx.stream(
        "POST",
        f"{gateway.url}/v1/chat/completions",
        json=request,
        headers=KEY,
        timeout=httpx.Timeout(5, read=0.8),
    ) as response:
        lines = response.iter_lines()
        received = [line for line in (next(lines), next(lines), next(lines)) if line]
    assert len(received) == 2 and all(r.startswith("data: {") for r in received)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("server", ["gateway's protocol", "uvicorn's h11"])
def test_client_disconnect_aborts_the_backend_request(
    fake: FakeBackend, stream: bool, server: str
) -> None:
    """With timeouts far away, only the client's leaving can close the upstream request.

    The gateway's server protocol tells the relay itself; under another server the relay
    watches `receive` for the disconnect.
    """
    settings = gateway_settings(
        [{"name": fake.name, "url": fake.url}], timeouts={"first_byte": 600, "idle": 600}
    )
    gateway = GatewayServer(settings, http="h11" if server == "uvicorn's h11" else None)
    try:
        request = chat(stream, hang_after=1) if stream else chat(hang=True)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{gateway.url}/v1/chat/completions", json=request, timeout=1.0)
        wait_until(lambda: fake.stats()["aborted"] == 1, 3, "the backend to see the abort")
    finally:
        gateway.close()


def test_backend_dying_mid_stream_ends_with_error_event_and_done(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(True, die_after=3), headers=KEY
    )
    assert response.status_code == 200
    tail = events(response.text)
    assert len(tail) == 5  # three chunks, the error, [DONE]
    error = json.loads(tail[-2].removeprefix("data: "))["error"]
    assert error["code"] == "bad_gateway" and "fake-chat" in error["message"]
    assert tail[-1] == "data: [DONE]"


def test_a_backend_dying_between_a_json_head_and_its_body_is_a_clean_502(
    gateway: GatewayServer,
) -> None:
    """A non-stream answer's head waits for its body (both go out in one write), so a backend
    that dies in between leaves the client an error it can read, not a 200 cut short."""
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(die_after_head=True), headers=KEY
    )
    assert response.status_code == 502
    assert "failed mid-response" in response.json()["error"]["message"]


def test_silent_backend_mid_stream_times_out_with_error_event(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(True, hang_after=2), headers=KEY, timeout=10
    )
    tail = events(response.text)
    assert json.loads(tail[-2].removeprefix("data: "))["error"]["code"] == "upstream_timeout"
    assert tail[-1] == "data: [DONE]"


def test_backend_that_never_answers_is_504(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(hang=True), headers=KEY, timeout=10
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "upstream_timeout"


def test_unreachable_backend_is_503_naming_the_model(
    gateway: GatewayServer, fake: FakeBackend
) -> None:
    fake.kill()
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(), headers=KEY)
    assert response.status_code == 503
    assert "fake-chat" in response.json()["error"]["message"]
    assert response.headers["retry-after"]


def test_backend_dropping_the_connection_before_answering_is_503(gateway: GatewayServer) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(drop=True), headers=KEY)
    assert response.status_code == 503
    assert "closed the connection before answering" in response.json()["error"]["message"]
    assert response.headers["retry-after"]


def test_backend_errors_pass_through_with_their_status(gateway: GatewayServer) -> None:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=chat(status=400), headers=KEY)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "fake failure"


def test_alias_reaches_a_backend_that_knows_only_the_canonical_name(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(model="chat"), headers=KEY
    )
    assert response.status_code == 200
    assert response.json()["model"] == "fake-chat"


def test_client_key_is_never_forwarded_and_request_id_is(gateway: GatewayServer) -> None:
    headers = {**KEY, "X-Request-Id": "req-123", "Connection": "keep-alive", "X-Custom": "kept"}
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(echo_headers=True), headers=headers
    )
    seen = response.json()["headers"]
    assert "authorization" not in seen
    assert seen.get("connection") != "keep-alive"  # the client's hop only
    assert seen["x-request-id"] == "req-123"
    assert seen["x-custom"] == "kept"
    assert response.headers["x-request-id"] == "req-123"


def test_path_and_query_string_reach_the_backend(gateway: GatewayServer) -> None:
    for query in ("", "?api-version=2024-10-21&x=%20y"):
        response = httpx.post(
            f"{gateway.url}/v1/chat/completions{query}", json=chat(echo_headers=True), headers=KEY
        )
        assert response.json()["url"] == f"/v1/chat/completions{query}"


def test_a_backend_redirect_is_passed_on_not_followed(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(redirect="/v1/elsewhere"), headers=KEY
    )
    assert response.status_code == 307
    assert response.headers["location"] == "/v1/elsewhere"


def test_cookies_a_backend_sets_go_to_that_client_only(fake: FakeBackend) -> None:
    """The upstream client keeps no cookie jar: one client's cookie never reaches another's
    request. (By a host name: aiohttp's default jar ignores cookies from IP addresses.)"""
    url = fake.url.replace("127.0.0.1", "localhost")
    gateway = GatewayServer(gateway_settings([{"name": fake.name, "url": url}]))
    try:
        endpoint = f"{gateway.url}/v1/chat/completions"
        first = httpx.post(endpoint, json=chat(echo_headers=True, set_cookie="session=alice"))
        assert first.headers["set-cookie"] == "session=alice"
        second = httpx.post(endpoint, json=chat(echo_headers=True))
        assert "cookie" not in second.json()["headers"]
    finally:
        gateway.close()


def test_malformed_request_ids_are_replaced(gateway: GatewayServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat(echo_headers=True),
        headers={**KEY, "X-Request-Id": "bad id with spaces"},
    )
    assert response.headers["x-request-id"] != "bad id with spaces"
    assert response.json()["headers"]["x-request-id"] == response.headers["x-request-id"]


def test_models_lists_names_and_aliases_with_context_length(gateway: GatewayServer) -> None:
    listing = httpx.get(f"{gateway.url}/v1/models", headers=KEY).json()
    assert listing["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in listing["data"]] == [
        ("fake-chat", 2048),
        ("chat", 2048),
    ]


def test_health_is_open_and_everything_else_needs_the_key(gateway: GatewayServer) -> None:
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/score"),
        ("GET", "/nowhere"),
    ]:
        response = httpx.request(method, f"{gateway.url}{path}", json=chat())
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=chat(),
        headers={"Authorization": "Bearer sk-wrong"},
    )
    assert wrong.status_code == 401
    anthropic_style = httpx.post(
        f"{gateway.url}/v1/chat/completions", json=chat(), headers={"x-api-key": "sk-client"}
    )
    assert anthropic_style.status_code == 200


def test_request_errors_are_openai_shaped(gateway: GatewayServer) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    cases = [
        (httpx.post(url, content=b"{oops", headers=KEY), 400, "invalid_json"),
        (httpx.post(url, json={"messages": []}, headers=KEY), 400, "invalid_model"),
        (httpx.post(url, json={"model": "gpt-4"}, headers=KEY), 404, "model_not_found"),
        (httpx.get(url, headers=KEY), 405, "method_not_allowed"),
        (httpx.get(f"{gateway.url}/v1/nowhere", headers=KEY), 404, "not_found"),
        (httpx.post(url, content=b"x" * (33 * 2**20), headers=KEY), 413, "payload_too_large"),
    ]
    for response, status, code in cases:
        assert response.status_code == status
        assert response.json()["error"]["code"] == code
    assert httpx.post(url, json=chat(), headers=KEY).status_code == 200  # still serving
