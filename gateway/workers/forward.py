"""A worker's way to the control plane for every path it does not relay itself.

The model list, metrics, the status page, the admin API and a backend's own metrics are the
control plane's: it holds the state they show and the parts they act on. A worker accepts
their connections like any other (one listening port for everything) and passes each request
on, as it came, to the control plane's private unix socket; the answer comes back as the
control plane wrote it, streamed. Access (keys) and CORS are the control plane's to apply,
once. Only `/health`, the one path a load balancer asks all the time, is answered here.
"""

from __future__ import annotations

from gateway.errors import ControlPlaneUnavailable, send_error
from gateway.h1 import Pool
from gateway.request import read_body, read_head
from gateway.types import Receive, Scope, Send
from gateway.upstream import HOP_BY_HOP, KNOWN, target

_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"expect"}
RETRY_CONTROL = 1  # seconds a client is told to wait when the control plane does not answer


class Forward:
    def __init__(self, uds: str, max_body_bytes: int, connect_timeout: float) -> None:
        """``uds``: the control plane's socket; ``max_body_bytes``: as the relay's limit."""
        self.pool = Pool("http://control-plane", uds=uds, connect_timeout=connect_timeout)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/health":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        head = read_head(scope["headers"])
        body = await read_body(receive, head.content_length, self.max_body_bytes)
        if body is None:
            return  # the client left while sending
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _NOT_FORWARDED]
        if not any(k.lower() == b"x-request-id" for k, _ in headers):
            headers.append((b"x-request-id", head.request_id))
        path = target(scope["path"], scope["query_string"])
        try:
            response = await self.pool.request(scope["method"], path, headers, body)
        except KNOWN:
            error = ControlPlaneUnavailable(
                "The gateway's control plane did not answer; retry shortly.",
                retry_after=RETRY_CONTROL,
            )
            await send_error(send, error, head.request_id, scope["path"])
            return
        completed = False
        try:
            kept = [(k, v) for k, v in response.raw_headers if k.lower() not in HOP_BY_HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": kept})
            while chunk := await response.readany():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            completed = True
        finally:
            response.release() if completed else response.close()

    def close(self) -> None:
        self.pool.close()
