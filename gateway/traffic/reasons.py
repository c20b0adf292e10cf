"""Why a request may leave its model for a fallback: the one place where a failure is read as
a reason (`models[].fallback_on`).

    unavailable     the gateway's 503s: no replica ready or reachable, loading, not started
    overloaded      a queue is full (the gateway's own refusal: the backends' ``QueueFull``,
                    or any gateway error coded `queue_full`), or vLLM answered 429 or 503
    timeout         no first byte within the model's `first_byte` (the gateway's 504)
    context_length  vLLM's 400 for a prompt longer than its max-model-len, known by vLLM's
                    own messages (vLLM 0.32: ``renderers/params.py``,
                    ``v1/engine/input_processor.py``, ``entrypoints/serve/utils/api_utils.py``,
                    ``entrypoints/openai/responses/serving.py``)

The gateway stopping is no reason: the fallback would be cut the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from backends.errors import QueueFull, ShuttingDown
from gateway.errors import BackendUnavailable, GatewayError, GatewayTimeout
from gateway.traffic.settings import FallbackReason

OVERLOADED_CODES = frozenset({"queue_full"})  # gateway errors that say a queue is full
OVERLOADED_STATUSES = frozenset({429, 503})  # vLLM's own answers that say the same
CONTEXT_STATUS = 400
# (pattern, the group of the model's limit, the group of what the prompt needs or 0)
_CONTEXT_MESSAGES = (
    (re.compile(r"maximum context length is (\d+) tokens\. However, your prompt contains "
                r"(?:at least )?(\d+) input tokens"), 1, 2),
    (re.compile(r"maximum context length is (\d+) tokens"), 1, 0),
    (re.compile(r"prompt \(length (\d+)\).* is longer than the maximum model length of (\d+)"),
     2, 1),
    (re.compile(r"Input length \((\d+)\) exceeds model's maximum context length \((\d+)\)"), 2, 1),
    (re.compile(r"prompt length (\d+) exceeds the max_model_len (\d+)"), 2, 1),
)  # fmt: skip


def of_error(error: GatewayError) -> FallbackReason | None:
    """The reason in a gateway error made before the backend answered; None: no reason."""
    cause = error.__cause__
    if isinstance(cause, ShuttingDown):
        return None
    if error.code in OVERLOADED_CODES or isinstance(cause, QueueFull):
        return "overloaded"
    if isinstance(error, GatewayTimeout):
        return "timeout"
    if isinstance(error, BackendUnavailable):
        return "unavailable"
    return None


def of_status(status: int) -> FallbackReason | None:
    """The reason in the status a backend answered with (a 400 needs its body: ``refusal``)."""
    return "overloaded" if status in OVERLOADED_STATUSES else None


@dataclass(frozen=True, slots=True)
class ContextRefusal:
    """vLLM refused a prompt as too long: a fallback must hold more than ``needs`` tokens."""

    limit: int  # the refusing model's max-model-len
    prompt: int  # the prompt's tokens where vLLM says, else 0

    @property
    def needs(self) -> int:
        return max(self.limit, self.prompt)


def context_refusal(body: bytes) -> ContextRefusal | None:
    """vLLM's 400 body, if it says the prompt is longer than the model's context."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    error = doc.get("error", doc) if isinstance(doc, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return None
    for pattern, limit, prompt in _CONTEXT_MESSAGES:
        if found := pattern.search(message):
            return ContextRefusal(int(found[limit]), int(found[prompt]) if prompt else 0)
    return None
