"""How a failure is read as a fallback reason (``gateway.traffic.reasons``): the gateway's own
errors by their class or code, vLLM's answers by their status, and a context-length refusal
by vLLM's own messages (copied from vLLM 0.32's source; the real server's is checked in
tests/integration/test_fallbacks.py)."""

from __future__ import annotations

import orjson
import pytest

from backends.errors import QueueFull, ShuttingDown, StartFailed
from gateway.backend_errors import from_backend
from gateway.config_file import settings_from_dict
from gateway.errors import (
    BackendLoading,
    BackendUnavailable,
    BadGateway,
    GatewayError,
    GatewayTimeout,
    InvalidRequest,
    RateLimited,
)
from gateway.traffic.fallback_plan import chains, fallback_graph
from gateway.traffic.reasons import ContextRefusal, context_refusal, of_error, of_status


class QueueFullHere(RateLimited):
    """A refusal some other part of the gateway may make: coded `queue_full`."""

    code = "queue_full"


def mapped(error: Exception) -> GatewayError:
    found = from_backend(error)  # type: ignore[arg-type]
    assert found is not None
    try:
        raise found from error  # as ``backend_errors()`` raises it
    except GatewayError as raised:
        return raised


def test_the_gateways_own_errors_are_read_by_their_kind() -> None:
    assert of_error(BackendUnavailable("no replica")) == "unavailable"
    assert of_error(BackendLoading("loading")) == "unavailable"
    assert of_error(mapped(StartFailed("could not start", retry_after=2))) == "unavailable"
    assert of_error(GatewayTimeout("no first byte")) == "timeout"
    assert of_error(BadGateway("malformed")) is None
    assert of_error(InvalidRequest("bad")) is None


def test_a_full_queue_is_overloaded_whoever_refused() -> None:
    assert of_error(mapped(QueueFull("start queue full", retry_after=5))) == "overloaded"

    class Busier(QueueFull):
        pass

    assert of_error(mapped(Busier("a subclass", retry_after=1))) == "overloaded"
    assert of_error(QueueFullHere("a gateway error coded queue_full")) == "overloaded"


def test_the_gateway_stopping_is_no_reason() -> None:
    assert of_error(mapped(ShuttingDown("stopping", retry_after=1))) is None


def test_vllm_overloaded_is_429_or_503() -> None:
    assert [of_status(s) for s in (429, 503, 500, 502, 400, 200)] == [
        "overloaded",
        "overloaded",
        None,
        None,
        None,
        None,
    ]


def body(message: str) -> bytes:
    error = {"message": message, "type": "BadRequestError", "param": None, "code": 400}
    return orjson.dumps({"error": error})


@pytest.mark.parametrize(
    ("message", "refusal"),
    [
        (
            "This model's maximum context length is 512 tokens. However, your prompt contains "
            "at least 513 input tokens, which exceeds this limit even without any output "
            "tokens. Please reduce the length of the input prompt.",
            ContextRefusal(512, 513),
        ),
        (
            "This model's maximum context length is 512 tokens. However, your prompt contains "
            "9000 characters (more than 4096 characters, which is the upper bound for 512 "
            "input tokens). Please reduce the length of the input prompt.",
            ContextRefusal(512, 0),
        ),
        (
            "The decoder prompt (length 600) is longer than the maximum model length of 512. "
            "Make sure that `max_model_len` is no smaller than the number of text tokens.",
            ContextRefusal(512, 600),
        ),
        (
            "The decoder prompt (length 512) plus the number of requested output tokens (at "
            "least 1) is longer than the maximum model length of 512. Make sure that "
            "`max_model_len` is no smaller than the number of text tokens (prompt + requested "
            "output tokens).",
            ContextRefusal(512, 512),
        ),
        (
            "Input length (700) exceeds model's maximum context length (512).",
            ContextRefusal(512, 700),
        ),
        (
            "The engine prompt length 800 exceeds the max_model_len 512. Please reduce prompt.",
            ContextRefusal(512, 800),
        ),
    ],
)
def test_vllms_context_length_refusals_are_known_by_their_messages(
    message: str, refusal: ContextRefusal
) -> None:
    assert context_refusal(body(message)) == refusal


def test_other_400s_are_not_context_refusals() -> None:
    assert context_refusal(body("temperature must be non-negative, got -1.")) is None
    assert context_refusal(b"not json") is None
    assert context_refusal(orjson.dumps({"error": "Unauthorized"})) is None


def test_a_chain_follows_each_fallbacks_own_depth_first_each_model_once() -> None:
    urls = {"url": "http://x.test"}
    models = [
        {"name": "a", **urls, "fallbacks": ["b", "d"]},
        {"name": "b", **urls, "fallbacks": ["c", "d"]},
        {"name": "c", **urls},
        {"name": "d", **urls, "fallbacks": ["c"]},
    ]
    settings = settings_from_dict({"models": models}, env={})
    found = chains(fallback_graph(settings.models, settings.canonical_names))
    assert found == {"a": ("b", "c", "d"), "b": ("c", "d"), "d": ("c",)}
