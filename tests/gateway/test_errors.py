"""Gateway errors render as OpenAI's error object, with the status fixed by the class."""

from typing import Any

import httpx
import orjson
import pytest

from gateway.app import create_app
from gateway.config_file import ConfigError, settings_from_dict
from gateway.errors import (
    AuthenticationFailed,
    BackendLoading,
    GatewayTimeout,
    ModelNotFound,
    sse_error_event,
)


def test_error_body_is_openai_shaped() -> None:
    error = ModelNotFound("no such model", param="model")
    assert error.status == 404
    assert orjson.loads(error.body()) == {
        "error": {
            "message": "no such model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_auth_errors_carry_invalid_api_key() -> None:
    error = AuthenticationFailed("bad key")
    assert (error.status, error.code) == (401, "invalid_api_key")


def test_retry_after_becomes_a_header() -> None:
    error = BackendLoading("loading", retry_after=10)
    assert error.status == 503
    assert (b"retry-after", b"10") in error.headers()


def test_a_broken_stream_ends_with_an_error_event_then_done() -> None:
    tail = sse_error_event(GatewayTimeout("backend stopped sending"))
    events = tail.decode().split("\n\n")
    assert orjson.loads(events[0].removeprefix("data: "))["error"]["code"] == "upstream_timeout"
    assert events[1] == "data: [DONE]"


async def test_an_operator_sets_how_long_clients_are_told_to_wait() -> None:
    """`retry_after.no_replica`: a spawned model whose server is not running (no lifespan ran)."""
    settings: dict[str, Any] = {"models": [{"name": "m", "vllm": {"model": "/models/m"}}]}
    settings["retry_after"] = {"no_replica": 42, "loading": 7}
    app = create_app(settings_from_dict(settings, env={}))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        answer = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
    assert answer.status_code == 503 and answer.headers["retry-after"] == "42"


def test_a_retry_after_below_one_second_is_refused() -> None:
    with pytest.raises(ConfigError, match="retry_after"):
        models = [{"name": "m", "url": "http://x"}]
        settings_from_dict({"models": models, "retry_after": {"loading": 0}}, env={})
