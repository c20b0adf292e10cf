"""Gateway errors render as OpenAI's error object, with the status fixed by the class."""

import orjson

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
