"""The one place where an unexpected exception becomes an answer: the outer error boundary.

Every failure the gateway expects is a ``GatewayError``, answered where it happens (the relay,
the control API's handlers, the access layer). Anything else that escapes the app is a bug.
This pure ASGI middleware, outside everything but CORS (so a browser can still read the 500),
logs its traceback, once, and answers for it:

- before the response started: OpenAI's 500 ``internal_error`` (Anthropic's ``api_error`` on
  the Messages API) with the request id, in the body and in ``x-request-id``;
- after a stream started: the SSE error event, then ``[DONE]``, as a relay cut by the backend
  ends (``gateway.errors.sse_error_event``);
- after any other response started: nothing more; the body stays cut and the server closes the
  connection, so the client cannot take a truncated answer for a whole one;
- after the response ended: nothing to tell the client; the traceback is logged all the same.

It does not re-raise, unlike Starlette's ``ServerErrorMiddleware`` (which re-raises so that
the server logs): this is the layer that logs, and a second traceback from uvicorn would be
noise. The control API's own ``ServerErrorMiddleware`` is taken out (``gateway.control``) so
that its exceptions reach here too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from gateway.errors import GatewayError, send_error, sse_error_event
from gateway.request import read_head
from gateway.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

_EVENT_STREAM = b"text/event-stream"


class InternalError(GatewayError):
    """A bug, answered as OpenAI's 500 (the root's status, type and code)."""


class ErrorBoundary:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = stream = False

        def watched(message: Message) -> Awaitable[None]:
            # A plain function handing back send's own awaitable: no coroutine of its own
            # per message, which a stream's every chunk would pay.
            nonlocal started, ended, stream
            if not message.get("more_body", False):  # the head, or the body's last message
                if message["type"] == "http.response.start":
                    started = True
                    stream = _is_stream(message.get("headers", ()))
                else:
                    ended = True
            return send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception:
            request_id = read_head(scope["headers"]).request_id
            log.exception(
                "Unexpected error on %s %s (request %s)",
                scope.get("method", "-"),
                scope.get("path", "-"),
                request_id.decode(),
            )
            error = InternalError(
                "The gateway failed on this request; its log has the error under request id "
                f"{request_id.decode()}."
            )
            try:
                if not started:
                    await send_error(send, error, request_id, scope.get("path", ""))
                elif stream and not ended:
                    body = sse_error_event(error)
                    await send({"type": "http.response.body", "body": body, "more_body": False})
            except Exception:  # the server refuses even that (the bug was in what was sent)
                log.debug("The error answer to request %s was not sent", request_id.decode())


def _is_stream(headers: object) -> bool:
    for name, value in headers:  # type: ignore[attr-defined]
        if name.lower() == b"content-type":
            return bool(value.lower().startswith(_EVENT_STREAM))
    return False
