"""The relay: a pure ASGI handler that forwards one request to its backend and streams back.

It reads the body (bounded), peeks at `model`, picks a replica, and relays the upstream response
chunk by chunk as it arrives: no buffering, no decoding of streams. A status and headers are
sent only once the backend answered them, so every failure before that is a clean OpenAI error
(and a replica that refused the connection is skipped for another); a stream that breaks after
its 200 ends with an SSE error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import orjson

from backends.on_demand import OnDemandModel, Unavailable
from backends.pool import Lease, Replica, ReplicaPool
from gateway import waits
from gateway.errors import (
    BackendLoading,
    BackendUnavailable,
    GatewayError,
    MethodNotAllowed,
    ModelNotStarted,
    send_error,
    sse_error_event,
)
from gateway.h1 import Response
from gateway.interrupt import Interrupter, Reason, deadline_sweeper
from gateway.key_limits import KeyLimiter
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.peek import model_from_json, model_from_multipart
from gateway.record import RequestRecord
from gateway.request import RequestHead, read_body, read_head
from gateway.routing import MULTIPART_PATHS, RouteTable
from gateway.telemetry import Telemetry
from gateway.types import Receive, Scope, Send
from gateway.upstream import (
    UpstreamClients,
    downstream_headers,
    target,
    translate,
    upstream_headers,
)
from gateway.usage import TAIL_BYTES, UsageStripper, ask_for_usage, find_usage

CLIENT_CLOSED = 499  # nginx's status for a request whose client left first (logs and metrics)
START_WAIT_HEADER = b"x-vllm-gateway-start-wait"  # seconds it waited for its model to start


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_body_bytes: int
    first_byte_timeout: float
    idle_timeout: float
    usage_for_all_streams: bool = False  # settings.stream_usage == "always"
    retry_loading: int = waits.RETRY_LOADING  # settings.retry_after
    retry_no_replica: int = waits.RETRY_NO_REPLICA


@dataclass(frozen=True, slots=True)
class _Job:
    """A routed request: where it goes and the exact bytes that go there."""

    pool: ReplicaPool
    body: bytes
    stripper: UsageStripper | None  # set when the gateway asked for usage on the client's behalf
    affinity: str | None = None  # the session key, for pools balanced by affinity
    adapter: str | None = None  # a LoRA adapter: only the replicas that hold it


class Relay:
    def __init__(
        self,
        table: RouteTable,
        clients: UpstreamClients,
        limits: RelayLimits,
        telemetry: Telemetry,
        key_limiter: KeyLimiter | None = None,
    ) -> None:
        self.table = table
        self.clients = clients
        self.limits = limits
        self.telemetry = telemetry
        self.key_limiter = key_limiter or KeyLimiter()
        self.deadlines = deadline_sweeper(limits.first_byte_timeout, limits.idle_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = read_head(scope["headers"])
        key: ApiKey | None = scope.get(SCOPE_KEY)
        record = RequestRecord(head.request_id.decode(), scope["path"])
        admitted = False
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['path']} accepts POST only.")
            if key is not None:
                record.key = key.name
                if key.limited:
                    self.key_limiter.admit(key)
                    admitted = True
            job = await self._prepare(scope, receive, head, key, record)
            if job is None:
                record.status = CLIENT_CLOSED
                return
            await self._forward(scope, receive, send, job, head, record)
        except GatewayError as exc:  # refused before any byte of a response was sent
            record.status, record.error = exc.status, exc.code
            await send_error(send, exc, head.request_id, scope["path"])
        finally:
            if admitted:
                self.key_limiter.release(key)  # type: ignore[arg-type]
            self.telemetry.finish(record)

    async def _prepare(
        self,
        scope: Scope,
        receive: Receive,
        head: RequestHead,
        key: ApiKey | None,
        record: RequestRecord,
    ) -> _Job | None:
        limits = self.limits
        body = await read_body(receive, head.content_length, limits.max_body_bytes)
        if body is None:
            return None  # the client left while sending
        path, allowed = scope["path"], key.models if key is not None else None
        if path in MULTIPART_PATHS:
            model, value = model_from_multipart(body, head.content_type)
            route = self.table.resolve(model, allowed)
            record.model = route.name
            pool = route.pool
            if route.via_alias:  # the backend knows the canonical name only
                body = body[: value.start] + pool.name.encode() + body[value.stop :]
            return _Job(pool, body, None, _affinity(pool, {}, scope), route.adapter)
        model, doc = model_from_json(body, head.content_type)
        route = self.table.resolve(model, allowed)
        record.model = route.name
        with_usage = ask_for_usage(path, doc) if limits.usage_for_all_streams else None
        if with_usage is not None or route.via_alias:
            # Re-encoded only when it must change: an alias becomes the canonical name (the
            # backend knows no other), or the stream is asked to report its token usage.
            body = orjson.dumps({**(with_usage or doc), "model": route.pool.name})
        stripper = UsageStripper() if with_usage is not None else None
        return _Job(route.pool, body, stripper, _affinity(route.pool, doc, scope), route.adapter)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        job: _Job,
        head: RequestHead,
        record: RequestRecord,
    ) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        guard = Interrupter(task, scope, receive, loop, self.deadlines)  # type: ignore[arg-type]
        response: Response | None = None
        lease: Lease | None = None
        started = completed = False
        try:
            try:
                if job.pool.on_demand is not None:
                    with guard.shutdown_interrupts():  # not timed: a start may take minutes
                        await self._started(job.pool.on_demand, record)
                guard.arm(self.limits.first_byte_timeout)
                response, lease, replica = await self._open(scope, job, head, record)
                record.status = response.status
                if response.status >= 500:
                    replica.note_failure()
                else:
                    replica.note_success()
                record.stream = response.content_type == "text/event-stream"
                # A JSON body follows its head at once: waiting for it lets both go out in one
                # write (gateway.coalescing). A stream's head goes out before its first token.
                first = b"" if record.stream else await response.readany()
                headers = downstream_headers(response, head.request_id)
                if record.start_wait is not None:
                    headers.append((START_WAIT_HEADER, b"%.3f" % record.start_wait))
                await send(
                    {"type": "http.response.start", "status": response.status, "headers": headers}
                )
                started = True
                if record.stream:
                    lease.stream()
                guard.arm(self.limits.idle_timeout)
                await self._pump(response, send, guard, job, record, first)
                completed = True
            except GatewayError:
                raise  # nothing sent yet: the caller answers with the error
            except Exception as exc:  # an upstream failure: the one place it is reported
                guard.stop()
                await self._fail(
                    send, translate(exc, job.pool.name, started=started), started, record
                )
        except asyncio.CancelledError:
            if guard.reason is None:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            guard.stop()
            if guard.reason is Reason.IDLE:
                error = translate(TimeoutError(), job.pool.name, started=started)
                await self._fail(send, error, started, record)
            elif guard.reason is Reason.SHUTDOWN:
                raise ModelNotStarted(
                    f"The gateway is shutting down before model {job.pool.name!r} started.",
                    retry_after=self.limits.retry_loading,
                ) from None
            else:
                record.error = "client_gone"
                record.status = record.status if started else CLIENT_CLOSED
        finally:
            guard.stop()
            if lease is not None:
                lease.release()
            if response is not None:
                # Closing (not releasing) an unfinished response drops the connection, which
                # is how vLLM learns to abort the generation.
                response.release() if completed else response.close()

    async def _started(self, model: OnDemandModel, record: RequestRecord) -> None:
        """Hold the request until its on-demand model serves (at once when it does)."""
        try:
            waited = await model.ready()
        except Unavailable as exc:
            raise ModelNotStarted.because(exc) from None
        if waited:
            record.start_wait = waited

    async def _open(
        self, scope: Scope, job: _Job, head: RequestHead, record: RequestRecord
    ) -> tuple[Response, Lease, Replica]:
        """Send the request to a replica; one that cannot be reached is skipped for the next.

        Only failures before any response (refused, reset before headers) are retried, so a
        request is never answered twice.
        """
        tried: list[Replica] = []
        while True:
            replica = _pick(job.pool, tried, job.affinity, job.adapter, self.limits)
            headers = upstream_headers(scope["headers"], replica.api_key, record.request_id)
            pool = self.clients.pool(replica.url, replica.uds)
            lease = replica.lease(job.pool)
            try:
                path = target(scope["path"], scope["query_string"])
                response = await pool.request("POST", path, headers, job.body)
            except BaseException as exc:
                lease.release()
                error = translate(exc, job.pool.name) if isinstance(exc, Exception) else None
                if not isinstance(error, BackendUnavailable):
                    raise
                replica.note_failure()
                tried.append(replica)
                if len(tried) >= len(job.pool.replicas):
                    raise error from None
                continue
            record.backend = replica.url
            return response, lease, replica

    async def _pump(
        self,
        response: Response,
        send: Send,
        guard: Interrupter,
        job: _Job,
        record: RequestRecord,
        first: bytes,
    ) -> None:
        """Relay the body as it arrives (``first``: what was read already). Per chunk: a clock
        read and a send, nothing else; the last bytes, when they come with the response's end,
        go in the closing message."""
        stripper = job.stripper if record.stream else None
        previous = last = b""
        more, chunk = True, first
        while more and (chunk or (chunk := await response.readany())):
            guard.touch()
            if stripper is not None and not (chunk := stripper.feed(chunk)):
                continue
            if record.ttfb is None:
                record.ttfb = time.perf_counter() - record.started
            more = stripper is not None or not response.complete
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            previous, last, chunk = last, chunk, b""
        if stripper is not None and (rest := stripper.flush()):
            await send({"type": "http.response.body", "body": rest, "more_body": True})
        if more:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if response.status == 200:
            record.usage = (
                stripper.usage
                if stripper is not None
                else find_usage((previous + last)[-TAIL_BYTES:])
            )

    async def _fail(
        self, send: Send, error: GatewayError, started: bool, record: RequestRecord
    ) -> None:
        if not started:
            raise error
        record.error = error.code
        if not record.stream:
            return  # a non-stream response cut mid-body stays truncated: the truth
        try:
            body = sse_error_event(error)
            await send({"type": "http.response.body", "body": body, "more_body": False})
        except OSError:
            pass  # the client is gone too


def _affinity(pool: ReplicaPool, doc: dict[str, Any], scope: Scope) -> str | None:
    """The session key: OpenAI's `user` field, else the pool's affinity header."""
    if pool.policy != "affinity":
        return None
    user = doc.get("user")
    if isinstance(user, str) and user:
        return user
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    return next((v.decode("latin-1") for k, v in headers if k == pool.affinity_header), None)


def _pick(
    pool: ReplicaPool,
    tried: list[Replica],
    affinity: str | None,
    adapter: str | None,
    limits: RelayLimits,
) -> Replica:
    replica = pool.pick(exclude=tried, affinity=affinity, adapter=adapter)
    if replica is not None:
        return replica
    if pool.loading:
        raise BackendLoading(
            f"Model {pool.name!r} is loading; retry in a few seconds.",
            retry_after=limits.retry_loading,
        )
    raise BackendUnavailable(
        f"No backend of model {pool.name!r} is available.", retry_after=limits.retry_no_replica
    )
