"""The gateway's errors, and the one place they become OpenAI-shaped responses.

Every error the gateway itself makes is a ``GatewayError`` subclass; the class fixes the HTTP
status, the OpenAI ``type`` and ``code``. Nothing chooses a status by reading message text.
On the Messages API (`/v1/messages`, `/v1/messages/count_tokens`) the same errors are written
in Anthropic's shape (`{"type": "error", "error": {"type": "not_found_error", ...}}`), as
vLLM writes its own there, so Anthropic's SDK raises its usual exceptions.

    GatewayError                      500 internal_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── InvalidJSON               400   code invalid_json
    │   ├── InvalidBody               400   code invalid_body (valid JSON, not an object)
    │   ├── InvalidModel              400   code invalid_model (param model)
    │   └── InvalidPriority           400   code invalid_priority (the priority header)
    ├── AuthenticationFailed          401 authentication_error / invalid_api_key
    ├── PermissionDenied              403 permission_error / insufficient_permissions
    │   └── PriorityNotAllowed        403   code priority_not_allowed (outside its key's range)
    ├── ModelNotFound                 404 invalid_request_error / model_not_found
    ├── RouteNotFound                 404 invalid_request_error / not_found
    ├── AdapterNotFound               404 invalid_request_error / adapter_not_found
    ├── Conflict                      409 invalid_request_error / conflict
    ├── MethodNotAllowed              405 invalid_request_error / method_not_allowed
    ├── RequestTimeout                408 invalid_request_error / request_timeout
    ├── PayloadTooLarge               413 invalid_request_error / payload_too_large
    ├── UnsupportedMediaType          415 invalid_request_error / unsupported_media_type
    ├── RateLimited                   429 rate_limit_error / rate_limit_exceeded (Retry-After)
    │   └── Overloaded                429   code queue_full: the model's queue (Retry-After)
    │       └── QueueTimedOut         429   code queue_timeout: waited its `max_wait`
    ├── HeadersTooLarge               431 invalid_request_error / request_header_fields_too_large
    ├── BadGateway                    502 upstream_error / bad_gateway
    ├── BackendUnavailable            503 service_unavailable / backend_unavailable
    │   ├── BackendLoading            503   code backend_loading (with Retry-After)
    │   ├── ModelNotStarted           503   code model_not_started (on-demand; Retry-After)
    │   │   └── MaxWaitExceeded       503   code max_wait_exceeded (x-vllm-gateway-max-wait)
    │   └── ControlPlaneUnavailable   503   code control_plane_unavailable (workers: N)
    ├── LimitsUnavailable             503 service_unavailable / limits_unavailable (Retry-After)
    └── GatewayTimeout                504 timeout_error / upstream_timeout

Errors of the HTTP client (gateway/h1/, the layer below) are translated into these in
``gateway.upstream`` only, and the backends' errors (backends/errors.py) in
``gateway.backend_errors`` only. Any other exception is a bug: the outer boundary
(``gateway.boundary``) logs it and answers 500 ``internal_error``.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import ClassVar

import orjson

from gateway.types import Send


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"
    code: ClassVar[str | None] = "internal_error"
    # Set where the request body may be left unread: the connection then cannot be reused.
    closes_connection: ClassVar[bool] = False

    def __init__(
        self, message: str, *, param: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after

    def body(self, path: str = "") -> bytes:
        """OpenAI's error object; Anthropic's on the Messages API, whose clients expect it."""
        if path in ANTHROPIC_PATHS:
            kind = _ANTHROPIC_TYPES.get(self.status, "api_error")
            return orjson.dumps({"type": "error", "error": {"type": kind, "message": self.message}})
        return error_body(self.message, self.type, self.code, self.param)

    def headers(self, request_id: bytes | None = None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", b"application/json")]
        if request_id is not None:
            headers.append((b"x-request-id", request_id))
        if self.retry_after is not None:
            headers.append((b"retry-after", str(self.retry_after).encode()))
        if self.closes_connection:
            headers.append((b"connection", b"close"))
        return headers


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code: ClassVar[str | None] = None


class InvalidJSON(InvalidRequest):
    code = "invalid_json"


class InvalidBody(InvalidRequest):
    code = "invalid_body"


class InvalidModel(InvalidRequest):
    code = "invalid_model"


class InvalidPriority(InvalidRequest):
    code = "invalid_priority"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class PriorityNotAllowed(PermissionDenied):
    """The priority header asks for more than the key's `priority_range` allows."""

    code = "priority_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class AdapterNotFound(GatewayError):
    """vLLM found no LoRA adapter at the path given (its message is passed on)."""

    status = 404
    type = "invalid_request_error"
    code = "adapter_not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    closes_connection = True
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    closes_connection = True
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(RateLimited):
    """The model's queue is full (made from the backends' ``QueueFull``)."""

    code = "queue_full"


class QueueTimedOut(Overloaded):
    """The request waited its model's `max_wait` for its turn (``QueueTimeout``)."""

    code = "queue_timeout"


class HeadersTooLarge(GatewayError):
    closes_connection = True
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class BadGateway(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class BackendUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"
    code = "backend_unavailable"


class BackendLoading(BackendUnavailable):
    code = "backend_loading"


class ModelNotStarted(BackendUnavailable):
    """An on-demand model could not be started for this request (made from the backends'
    own errors in ``gateway.backend_errors``)."""

    code = "model_not_started"


class ControlPlaneUnavailable(BackendUnavailable):
    """A worker could not reach its control plane, which answers every path the worker does
    not relay itself (``gateway.workers.forward``)."""

    code = "control_plane_unavailable"


class LimitsUnavailable(GatewayError):
    """The shared limits store cannot be reached and `limits_store.on_error` is fail_closed:
    a 503 (the gateway cannot serve it now), not a 429 (the key is not over its limit)."""

    status = 503
    type = "service_unavailable"
    code = "limits_unavailable"


class MaxWaitExceeded(ModelNotStarted):
    """An on-demand model would not serve, or did not, within the wait its client allows
    (`x-vllm-gateway-max-wait`, or its key's `max_wait`); the message has the estimate."""

    code = "max_wait_exceeded"


class GatewayTimeout(GatewayError):
    status = 504
    type = "timeout_error"
    code = "upstream_timeout"


ANTHROPIC_PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
# Anthropic's error types by status (its API uses 529 for overload; a 503 is the nearest here).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "overloaded_error",
}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def sse_error_event(error: GatewayError) -> bytes:
    """The tail of a stream that broke after its 200 was sent: an error event, then [DONE].

    vLLM ends its own streams the same way, so clients that handle one handle both.
    """
    return b"data: " + error.body() + b"\n\ndata: [DONE]\n\n"


async def send_error(
    send: Send, error: GatewayError, request_id: bytes | None = None, path: str = ""
) -> None:
    """Render a gateway error as OpenAI's error JSON (the control API's FastAPI handlers render
    the same body and headers through ``GatewayError.headers``)."""
    body = error.body(path)
    headers = [*error.headers(request_id), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def raw_response(error: GatewayError) -> bytes:
    """The error as a whole HTTP/1.1 response, for refusals made below ASGI (the protocol).

    Only errors that close the connection are sent this way."""
    body = error.body()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}".encode()]
    head += [name + b": " + value for name, value in error.headers()]
    head.append(b"content-length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body
