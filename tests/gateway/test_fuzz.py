"""Property-based fuzzing: whatever a client sends, the gateway answers, never with a 500.

Hypothesis generates requests around the shapes the gateway reads (method, path, content type,
the `model` value, the body, request ids, credentials); each must get an answer below 500 (or
the backend's own answer), in OpenAI's error shape when it is the gateway's refusal. Sized to
run in seconds; raise FUZZ_EXAMPLES for a longer hunt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.routing import RELAYED_PATHS
from tests.servers import FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEY = "sk-fuzz"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1000"))


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[GatewayServer, httpx.Client]]:
    fake = FakeBackend("fake-chat")
    settings_ = gateway_settings(
        [{"name": "fake-chat", "aliases": ["chat"], "url": fake.url}],
        api_keys=[KEY, {"name": "limited", "key": "sk-limited", "models": ["fake-chat"]}],
        max_body_bytes=16 * 1024,
        timeouts={"first_byte": 5, "idle": 5, "client": 2},
    )
    gateway = GatewayServer(settings_)
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        yield gateway, client
    gateway.close()
    fake.close()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
models = st.sampled_from(["fake-chat", "chat", "", "..", "fake-chat/../x", "%2e"]) | json_values
bodies = st.one_of(
    st.builds(
        lambda m, extra: orjson.dumps({**extra, "model": m}),
        models,
        st.dictionaries(st.sampled_from(["messages", "input", "stream", "n"]), json_values),
    ),
    json_values.map(orjson.dumps),
    st.binary(max_size=300),
    st.just(b"x" * (16 * 1024 + 1)),
)
# Each outer layer is usually right, so that most requests reach the layers below it.
paths = st.sampled_from(sorted(RELAYED_PATHS)) | st.one_of(
    st.sampled_from(["/v1/models", "/health", "/v1/x", "/", "/v1/%2e%2e/models", "/v1//x"]),
    st.text(alphabet="/abc.%2e", min_size=1, max_size=20).map(lambda p: "/x/" + p),
)
content_types = st.just("application/json") | st.sampled_from(
    ["text/plain", "multipart/form-data; boundary=b", "", "application/x+json"]
)
credentials = st.just(f"Bearer {KEY}") | st.sampled_from(
    ["Bearer sk-limited", "Bearer wrong", "Basic abc", "", f"bearer  {KEY}"]
)
request_ids = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=200)


@settings(
    max_examples=EXAMPLES,
    database=None,
    derandomize="FUZZ_EXAMPLES" not in os.environ,  # the same examples in every CI run
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.just("POST") | st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=paths,
    content_type=content_types,
    body=bodies,
    authorization=credentials,
    request_id=request_ids,
)
def test_no_request_gets_a_500(
    target: tuple[GatewayServer, httpx.Client],
    method: str,
    path: str,
    content_type: str,
    body: bytes,
    authorization: str,
    request_id: str,
) -> None:
    _, client = target
    headers = {"Content-Type": content_type, "X-Request-Id": request_id}
    if authorization:
        headers["Authorization"] = authorization
    response = client.request(method, path, content=body, headers=headers)
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
        error: Any = response.json().get("error")  # the backend's own 404 has "detail" instead
        if isinstance(error, dict):
            assert error["message"] and error["type"]


def test_the_gateway_still_serves_after_the_fuzzing(
    target: tuple[GatewayServer, httpx.Client],
) -> None:
    _, client = target
    response = client.post(
        "/v1/chat/completions",
        json={"model": "chat", "messages": []},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status_code == 200
