"""The relay: a pure ASGI handler that forwards one request to its backend and streams back.

It reads the body (bounded), peeks at `model`, picks a replica, and relays the upstream response
chunk by chunk as it arrives: no buffering, no decoding of streams. A status and headers are
sent only once the backend answered them, so every failure before that is a clean OpenAI error;
a stream that breaks after its 200 ends with an SSE error event and ``[DONE]``.

Two things can interrupt a relay from outside: the client leaving (the upstream request is then
closed, and vLLM aborts the generation) and a backend that stays silent for too long.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from backends.pool import Replica, ReplicaPool
from gateway.errors import (
    BackendLoading,
    BackendUnavailable,
    GatewayError,
    GatewayTimeout,
    MethodNotAllowed,
    send_error,
    sse_error_event,
)
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.limits import KeyLimiter
from gateway.peek import body_with_model, model_from_json, model_from_multipart
from gateway.request import RequestHead, path_and_query, read_body, read_head
from gateway.routing import MULTIPART_PATHS, RouteTable
from gateway.types import Message, Receive, Scope, Send
from gateway.upstream import UpstreamClients, downstream_headers, translate, upstream_headers


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_body_bytes: int
    first_byte_timeout: float
    idle_timeout: float
    client_timeout: float = 60.0


class Relay:
    def __init__(
        self,
        table: RouteTable,
        clients: UpstreamClients,
        limits: RelayLimits,
        key_limiter: KeyLimiter | None = None,
    ) -> None:
        self.table = table
        self.clients = clients
        self.limits = limits
        self.key_limiter = key_limiter or KeyLimiter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = read_head(scope["headers"])
        key: ApiKey | None = scope.get(SCOPE_KEY)
        limited = key is not None and key.limited
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['path']} accepts POST only.")
            if limited:
                self.key_limiter.admit(key)  # type: ignore[arg-type]
        except GatewayError as exc:
            await send_error(send, exc, head.request_id)
            return
        try:
            await self._relay(scope, receive, send, head, key)
        finally:
            if limited:
                self.key_limiter.release(key)  # type: ignore[arg-type]

    async def _relay(
        self, scope: Scope, receive: Receive, send: Send, head: RequestHead, key: ApiKey | None
    ) -> None:
        try:
            body = await read_body(
                receive, head.content_length, self.limits.max_body_bytes, self.limits.client_timeout
            )
            if body is None:
                return  # the client left while sending
            pool, body = self._route(scope["path"], head.content_type, body, key)
            replica = _pick(pool)
        except GatewayError as exc:
            await send_error(send, exc, head.request_id)
            return
        await self._forward(scope, receive, send, pool, replica, body, head.request_id)

    def _route(
        self, path: str, content_type: str, body: bytes, key: ApiKey | None
    ) -> tuple[ReplicaPool, bytes]:
        allowed = key.models if key is not None else None
        if path in MULTIPART_PATHS:
            model = model_from_multipart(body, content_type)
            return self.table.resolve(model, allowed).pool, body
        model, doc = model_from_json(body, content_type)
        route = self.table.resolve(model, allowed)
        if route.via_alias:
            body = body_with_model(doc, route.pool.name)
        return route.pool, body

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        pool: ReplicaPool,
        replica: Replica,
        body: bytes,
        request_id: bytes,
    ) -> None:
        url = replica.url + path_and_query(scope)
        headers = upstream_headers(scope["headers"], replica.api_key, request_id.decode())
        session = self.clients.session(replica.url)
        guard = _Interrupter(asyncio.current_task(), receive)  # type: ignore[arg-type]
        response = None
        started = completed = is_sse = False
        replica.in_flight += 1
        try:
            try:
                guard.arm(self.limits.first_byte_timeout)
                response = await session.post(url, data=body, headers=headers)
                is_sse = response.content_type == "text/event-stream"
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": downstream_headers(response, request_id),
                    }
                )
                started = True
                guard.arm(self.limits.idle_timeout)
                content = response.content
                while chunk := await content.readany():
                    guard.touch()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                completed = True
            except Exception as exc:  # an upstream failure: the one place it is reported
                guard.stop()
                error = translate(exc, pool.name, started=started)
                await _fail(send, error, request_id, started, started and is_sse)
        except asyncio.CancelledError:
            if guard.reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            guard.stop()
            if guard.reason is _Reason.IDLE:
                what = "stopped sending" if started else "did not answer in time"
                error = GatewayTimeout(f"The backend for model {pool.name!r} {what}.")
                await _fail(send, error, request_id, started, started and is_sse)
        finally:
            guard.stop()
            replica.in_flight -= 1
            if response is not None:
                # Closing (not releasing) an unfinished response drops the connection, which
                # is how vLLM learns to abort the generation.
                response.release() if completed else response.close()


def _pick(pool: ReplicaPool) -> Replica:
    replica = pool.pick()
    if replica is not None:
        return replica
    if pool.loading:
        raise BackendLoading(
            f"Model {pool.name!r} is loading; retry in a few seconds.", retry_after=10
        )
    raise BackendUnavailable(f"No backend of model {pool.name!r} is available.", retry_after=30)


async def _fail(
    send: Send, error: GatewayError, request_id: bytes, started: bool, is_sse: bool
) -> None:
    try:
        if not started:
            await send_error(send, error, request_id)
        elif is_sse:
            body = sse_error_event(error)
            await send({"type": "http.response.body", "body": body, "more_body": False})
        # A non-stream response cut mid-body is left incomplete: the server closes the
        # connection and the client sees a truncated response, which is the truth.
    except OSError:
        pass  # the client is gone too


class _Reason:
    CLIENT_GONE = "client_gone"
    IDLE = "idle"


class _Interrupter:
    """Cancels the relay task when the client disconnects or the backend stays silent.

    The timer is lazy: each chunk only records the time, and the timer, when it fires, re-arms
    itself at the last chunk's deadline. A stream pays one clock read per chunk, not a timer.
    """

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.reason: str | None = None
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._limit = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = self._loop.create_task(self._watch(receive))

    def arm(self, seconds: float) -> None:
        self._limit = seconds
        self._last = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._last + seconds, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _check(self) -> None:
        deadline = self._last + self._limit
        if self._loop.time() >= deadline:
            self._timer = None
            self._interrupt(_Reason.IDLE)
        else:
            self._timer = self._loop.call_at(deadline, self._check)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._interrupt(_Reason.CLIENT_GONE)
                return

    def _interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._task.cancel()
