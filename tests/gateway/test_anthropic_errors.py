"""On the Messages API the gateway's own errors are Anthropic-shaped, as vLLM's are there, so
Anthropic's SDK raises its usual exceptions; every other path keeps OpenAI's shape. (A gateway
on loopback: the SDK brings an HTTP client of its own.)"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.servers import GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEYS = [
    {"name": "team", "key": "sk-team", "requests_per_minute": 1},
    {"name": "embed-only", "key": "sk-embed", "models": ["tiny-embed"]},
]
MODELS = [
    {"name": "tiny-chat", "url": "http://127.0.0.1:9"},  # nothing listens: 503
    {"name": "tiny-embed", "url": "http://127.0.0.1:9"},
]


@pytest.fixture
def gateway() -> Iterator[GatewayServer]:
    server = GatewayServer(gateway_settings(MODELS, api_keys=KEYS, max_body_bytes=4096))
    yield server
    server.close()


def sdk(gateway: GatewayServer, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=key, base_url=gateway.url, max_retries=0)


def message(model: str, text: str = "hi") -> dict[str, Any]:
    return {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize(
    ("key", "body", "raised", "kind"),
    [
        ("sk-wrong", message("tiny-chat"), anthropic.AuthenticationError, "authentication_error"),
        ("sk-embed", message("tiny-chat"), anthropic.NotFoundError, "not_found_error"),
        (
            "sk-team",
            message("tiny-chat", "x" * 5000),
            anthropic.APIStatusError,
            "request_too_large",
        ),
        ("sk-team", message("tiny-chat"), anthropic.InternalServerError, "overloaded_error"),
    ],
    ids=["bad key", "unknown model", "too large", "backend down"],
)
def test_the_sdk_gets_anthropic_errors(
    gateway: GatewayServer, key: str, body: dict[str, Any], raised: type[Exception], kind: str
) -> None:
    with pytest.raises(raised) as caught:
        sdk(gateway, key).messages.create(**body)
    error = caught.value.body  # type: ignore[attr-defined]
    assert error["type"] == "error" and error["error"]["type"] == kind, error
    assert error["error"]["message"]


def test_rate_limits_and_count_tokens_too_and_openai_paths_stay_openai(
    gateway: GatewayServer,
) -> None:
    client = sdk(gateway, "sk-team")
    with pytest.raises(anthropic.InternalServerError):
        client.messages.create(**message("tiny-chat"))  # uses the one request a minute
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.count_tokens(model="tiny-chat", messages=message("x")["messages"])
    assert limited.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    openai_shaped = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "nope"},
        headers={"x-api-key": "sk-embed"},
    )
    assert openai_shaped.json()["error"]["code"] == "model_not_found"
