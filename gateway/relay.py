"""The relay: a pure ASGI handler that forwards one request to its backend and streams back.

It reads the body (bounded), routes it by its `model` (``gateway.job``), and hands the upstream
half to an ``Exchange`` (``gateway.exchange``: a replica picked, the request sent); where the
model cannot answer for a reason its `fallback_on` names, the same body goes to its next
fallback (``gateway.traffic``), all before a byte was sent. The response is relayed chunk by
chunk as it arrives (``gateway.pump``), with no buffering and no decoding of streams.
A status and headers are sent only once the backend answered them, so every failure before
that is a clean OpenAI error; a stream that breaks after its 200 ends with an SSE error event
and ``[DONE]``. An exception that is no gateway error is a bug and goes on, to the outer
boundary (``gateway.boundary``), which logs it and answers 500.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from dataclasses import dataclass

from backends import clock
from backends.on_demand_api import Startable
from backends.queues import ModelQueue, Slot
from gateway import job as jobs
from gateway import waits
from gateway.backend_errors import backend_errors
from gateway.errors import GatewayError, MethodNotAllowed, ModelNotStarted, send_error
from gateway.exchange import Exchange, RetryAfter
from gateway.interrupt import Interrupter, Reason, deadline_sweeper
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.limits.local import LocalLimits
from gateway.limits.store import LimitsStore
from gateway.pump import cut, pump
from gateway.record import UNROUTED, RequestRecord
from gateway.request import RequestHead, max_wait, read_body, read_head
from gateway.routing import RouteTable
from gateway.telemetry import Telemetry
from gateway.traffic import admission, reasons
from gateway.traffic.admission import Ticket
from gateway.traffic.fallback import FallbackWalk, read_whole
from gateway.traffic.plan import Deadlines, TrafficPlan
from gateway.types import Receive, Scope, Send
from gateway.upstream import UpstreamResponse, Upstreams, translate

CLIENT_CLOSED = 499  # nginx's status for a request whose client left first (logs and metrics)
INTERNAL = 500  # a bug: counted here, answered and logged by the boundary


@dataclass(frozen=True, slots=True)
class RelayLimits:
    max_body_bytes: int
    first_byte_timeout: float
    idle_timeout: float
    usage_for_all_streams: bool = False  # settings.stream_usage == "always"
    retry_loading: int = waits.RETRY_LOADING  # settings.retry_after
    retry_no_replica: int = waits.RETRY_NO_REPLICA
    # Each model's deadlines and fallbacks; None: the timeouts above for all, no fallbacks.
    traffic: TrafficPlan | None = None


class Relay:
    def __init__(
        self,
        table: RouteTable,
        upstreams: Upstreams,
        limits: RelayLimits,
        telemetry: Telemetry,
        key_limits: LimitsStore | None = None,
    ) -> None:
        self.table = table
        self.upstreams = upstreams
        self.limits = limits
        self.telemetry = telemetry
        self.tracing = telemetry.tracing  # None unless the config has `tracing`
        self.key_limits = key_limits or LocalLimits()  # fixed for the process's life
        self.use_limits(limits)

    def use_limits(self, limits: RelayLimits) -> None:
        """The limits new requests get (a reload changes them; requests in flight keep theirs)."""
        self.limits = limits
        default = Deadlines(None, limits.first_byte_timeout, limits.idle_timeout)
        self.traffic = limits.traffic or TrafficPlan(default)
        self.deadlines = deadline_sweeper(self.traffic.shortest)
        self.retry_after = RetryAfter(limits.retry_loading, limits.retry_no_replica)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        head = read_head(scope["headers"])
        key: ApiKey | None = scope.get(SCOPE_KEY)
        record = RequestRecord(head.request_id.decode(), scope["path"])
        if self.tracing is not None:  # [trace hook 1: the request's server span begins]
            record.trace = self.tracing.request(scope)
        held = False  # a slot of the key's max_concurrent, given back at the end
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{scope['path']} accepts POST only.")
            waits_for = max_wait(head, key.max_wait if key is not None else None)
            if key is not None:
                record.key = key.name
                if key.limited:
                    limits = self.key_limits  # only a store across the network is awaited
                    held = await limits.ask(key) if limits.remote else limits.admit(key)
            body = await read_body(receive, head.content_length, self.limits.max_body_bytes)
            if body is None:
                record.status = CLIENT_CLOSED  # the client left while sending
                return
            allowed = key.models if key is not None else None
            usage = self.limits.usage_for_all_streams
            job = jobs.route(scope, body, head.content_type, self.table, allowed, usage)
            ticket = None
            if (  # [traffic: priority] (an on-demand model's swaps weigh it too)
                job.pool.queue is not None
                or job.pool.priority_field
                or job.pool.on_demand is not None
            ):
                ticket = admission.ticket(key, head.priority)
                if job.pool.priority_field:
                    job = admission.with_priority(job, scope["path"], ticket.priority)
            record.model = job.model
            if record.trace is not None:  # [trace: the model asked for]
                record.trace.asked = job.asked
            deadline = None if waits_for is None else clock.now() + waits_for
            await self._relay(job, head, allowed, scope, receive, send, record, deadline, ticket)
        except GatewayError as exc:  # refused before any byte of a response was sent
            record.status, record.error = exc.status, exc.code
            await send_error(send, exc, head.request_id, scope["path"])
        finally:
            if held:
                self.key_limits.release(key)  # type: ignore[arg-type]
            if isinstance(sys.exception(), Exception):  # a bug, on its way to the boundary
                record.status, record.error = INTERNAL, "internal_error"
            self.telemetry.finish(record)
            if record.trace is not None:  # [trace hook 7: the request's spans end]
                record.trace.finish(record)

    async def _relay(
        self,
        job: jobs.Job,
        head: RequestHead,
        allowed: frozenset[str] | None,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        deadline: float | None = None,
        ticket: Ticket | None = None,
    ) -> None:
        """Find the answer (its model's, or a fallback's), send its head, relay its body; a
        failure once the head is out cuts the response (``gateway.pump.cut``)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        guard = Interrupter(task, scope, receive, loop, self.deadlines)  # type: ignore[arg-type]
        traffic = self.traffic  # a reload swaps it for new requests, not for this one
        walk = None
        if (fallbacks := traffic.fallbacks.get(job.model)) is not None:
            args = (self.table, allowed, self.upstreams, scope, head.content_type)
            walk = FallbackWalk(fallbacks, job, *args)
        exchange: Exchange | None = None
        started = completed = False
        try:
            answer = await self._answer(
                job, walk, traffic, scope, head, guard, record, deadline, ticket
            )
            exchange, response, first = answer
            record.backend, record.status = exchange.backend, response.status
            record.stream = exchange.streams
            with exchange.reading():
                status, headers = response.status, exchange.headers(record.start_wait)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                started = True
                guard.arm(traffic.deadlines_of(exchange.job.pool.name).idle)
                await pump(response, exchange.job.stripper, send, guard, record, first)
            completed = True
        except GatewayError as error:
            guard.stop()
            if not started:
                raise  # nothing sent yet: the caller answers with the error
            await cut(send, error, record)
        except asyncio.CancelledError:
            if guard.reason is None:
                raise  # not the guard's: the server's own
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            guard.stop()
            if (told := self._interruption(guard.reason, record.model, started)) is None:
                record.error = "client_gone"
                record.status = record.status if started else CLIENT_CLOSED
            elif not started:
                raise told from None
            else:
                await cut(send, told, record)
        finally:
            guard.stop()
            if exchange is not None:
                exchange.close(completed)
                if completed and (model := exchange.job.pool.on_demand) is not None:
                    # its service rate, for the swap scheduler (backends.swap_costs)
                    upstream = time.perf_counter() - record.started - (record.start_wait or 0.0)
                    model.served(upstream, record.usage[1] if record.usage else 0)

    async def _answer(
        self,
        job: jobs.Job,
        walk: FallbackWalk | None,
        traffic: TrafficPlan,
        scope: Scope,
        head: RequestHead,
        guard: Interrupter,
        record: RequestRecord,
        deadline: float | None,
        ticket: Ticket | None,
    ) -> tuple[Exchange, UpstreamResponse, bytes]:
        """The first answer that will do: the model's own or, where it cannot give one for a
        reason its `fallback_on` names, the next fallback's (``gateway.traffic``). Returns
        the exchange whose head has arrived, and the body bytes read; nothing is sent yet."""
        while True:
            if walk is not None:
                job = walk.job
                if _cold(job) and await walk.move("unavailable", record, ready=True):
                    if job.pool.on_demand is not None:  # started all the same, for later ones
                        job.pool.on_demand.want()
                    continue
            record.model = job.model
            deadlines = traffic.deadlines_of(job.pool.name)
            exchange = Exchange(
                self.upstreams,
                job,
                scope,
                head.request_id,
                self.retry_after,
                record.trace,
                deadlines.connect,
            )
            answered = False
            try:
                response, first = await self._attempt(
                    exchange, guard, deadlines, record, walk, deadline, ticket
                )
                if walk is None or not await walk.refused(response.status, first, record):
                    answered = True
                    return exchange, response, first
            except GatewayError as error:
                if walk is None or not await walk.move(reasons.of_error(error), record):
                    raise
            finally:
                if not answered:
                    exchange.close(False)
            guard.reset()  # the next model's deadline starts from nothing

    async def _attempt(
        self,
        exchange: Exchange,
        guard: Interrupter,
        deadlines: Deadlines,
        record: RequestRecord,
        walk: FallbackWalk | None,
        deadline: float | None,
        ticket: Ticket | None,
    ) -> tuple[UpstreamResponse, bytes]:
        """One model's try: wait until it serves, send, and read what a head waits for (a
        JSON body's first bytes; all of a 400 that may be a context-length refusal)."""
        pool = exchange.job.pool
        if pool.queue is not None:  # its turn (and an on-demand start): not timed here
            with guard.shutdown_interrupts():
                turn = ticket or Ticket()
                exchange.slot = await self._admitted(pool.queue, exchange, record, turn, deadline)
        elif pool.on_demand is not None:
            with guard.shutdown_interrupts():  # not timed: a start may take minutes
                priority = ticket.priority if ticket is not None else 0
                await self._started(pool.on_demand, record, deadline, priority)
        if pool.hold_for:  # a reload restarts its servers: wait, as for a start
            with guard.shutdown_interrupts():
                await _until_serving(exchange, record)
        guard.arm(deadlines.first_byte)
        try:
            response = await exchange.open()
            with exchange.reading():
                # A JSON body follows its head at once: waiting for it lets both go out in one
                # write (gateway.coalescing). A stream's head goes out before its first token.
                first = b"" if exchange.streams else await response.readany()
                if walk is not None and walk.reads_whole(response.status):
                    first = await read_whole(response, first)
        except asyncio.CancelledError:
            if guard.reason is not Reason.IDLE or walk is None:
                raise  # the client left, or no fallback: the relay's own handling
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            raise exchange.timed_out(started=False) from None
        return response, first

    def _interruption(self, reason: str, model: str, started: bool) -> GatewayError | None:
        """What the guard's interruption tells the client; None when the client left."""
        if reason is Reason.IDLE:
            return translate(TimeoutError(), model, started=started)
        if reason is Reason.SHUTDOWN:
            return ModelNotStarted(
                f"The gateway is shutting down while this request waited for model {model!r} "
                "(its start, or its turn).",
                retry_after=self.limits.retry_loading,
            )
        return None

    async def _admitted(
        self,
        queue: ModelQueue,
        exchange: Exchange,
        record: RequestRecord,
        ticket: Ticket,
        deadline: float | None,
    ) -> Slot:
        """The request's slot, once its turn has come (and its on-demand model serves)."""
        model = exchange.job.pool.on_demand
        bring_up = (
            None
            if model is None
            else functools.partial(self._started, model, record, deadline, ticket.priority)
        )
        began = time.monotonic()
        with backend_errors():
            slot = await queue.admit(ticket.priority, ticket.key, ticket.weight, bring_up)
        record.queue_wait = time.monotonic() - began
        return slot

    async def _started(
        self, model: Startable, record: RequestRecord, deadline: float | None, priority: int
    ) -> None:
        """Hold the request until its on-demand model serves (at once when it does), within
        the wait its client allows (``deadline``, on ``backends.clock``); its key and
        ``priority`` are what the swap scheduler weighs the model's demand by."""
        key = record.key if record.key != UNROUTED else None
        with backend_errors():
            if record.trace is None:
                waited = await model.ready(deadline, key=key, priority=priority)
            else:
                with record.trace.waiting(model):  # [trace: the wait for its model]
                    waited = await model.ready(deadline, key=key, priority=priority)
        if waited:
            record.start_wait = (record.start_wait or 0.0) + waited


def _cold(job: jobs.Job) -> bool:
    """Its model would hold the request for a start, a wake or a restart."""
    pool = job.pool
    if pool.on_demand is not None:
        return not pool.on_demand.serving
    return bool(pool.hold_for) and not pool.ready_for(job.adapter)


async def _until_serving(exchange: Exchange, record: RequestRecord) -> None:
    """Until a replica of the model can take the request, within the pool's ``hold_for``."""
    job = exchange.job
    pool = job.pool
    if pool.life is None or pool.ready_for(job.adapter):
        return
    began = time.monotonic()
    await pool.life.until(lambda: pool.ready_for(job.adapter), timeout=pool.hold_for)
    record.start_wait = (record.start_wait or 0.0) + time.monotonic() - began
