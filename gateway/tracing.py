"""OpenTelemetry traces: one per relayed request, admin action and swap (docs/tracing.md).

Built only when the config has `tracing`; without it no tracer exists and the relay's hooks
are one ``record.trace is None`` test each. The gateway keeps its own ``TracerProvider``
(never the process-global one: several gateways may share a process, in tests), exports in
batches from the SDK's own thread, and never waits for the collector: when the export queue is
full a span is dropped and counted (``SpanCounts``, in /metrics).

A request's spans::

    POST /v1/chat/completions            server span: model asked for and answered, key name,
    ├── gateway.wait_for_model           status, stream, tokens, replica, error type
    │   └── backends.swap                (on-demand models that were not serving)
    ├── gateway.upstream_attempt  #1     a replica that could not be reached: retried
    └── gateway.upstream_attempt  #2     the backend's `traceparent` names this span, so
        └── llm_request (vLLM)           vLLM's own span nests under it

A request that falls back to another model (``gateway.traffic``) has a `fallback` event on
its server span per move, and the attempts of every model it tried, each one ended as it left.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from backends.on_demand_api import Startable
from backends.pool import Replica
from gateway.errors import GatewayError
from gateway.metrics import SpanCounts
from gateway.record import FallbackMove, RequestRecord
from gateway.tracing_settings import TracingSettings
from gateway.types import Scope

MAX_QUEUE = 2048  # spans held for export; past it new ones are dropped (and counted)
BATCH = 512
EXPORT_EVERY_MS = 1000
EXPORT_TIMEOUT = 5.0  # seconds one export may take, retries included (the SDK's thread waits)
TRACE_HEADERS = (b"traceparent", b"tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The gateway's tracer, its bounded export, and what the export did (``counts``)."""

    def __init__(self, settings: TracingSettings, exporter: SpanExporter | None = None) -> None:
        """``exporter``: where spans go; OTLP to ``settings.url`` unless given."""
        self.counts = SpanCounts()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service_name}),
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            shutdown_on_exit=False,  # the lifespan shuts it down (``aclose``)
        )
        counting = _CountingExporter(exporter or otlp_exporter(settings), self.counts)
        self.provider.add_span_processor(_BoundedBatchProcessor(counting, self.counts))
        self.tracer = self.provider.get_tracer("vllm-gateway")

    def request(self, scope: Scope) -> RequestTrace:
        """The trace of one relayed request, continuing the client's `traceparent` if any."""
        parent = _client_context(scope["headers"])
        name = f"{scope['method']} {scope['path']}"
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "http.route": scope["path"]},
        )
        return RequestTrace(self.tracer, span)

    @contextlib.contextmanager
    def admin(
        self, action: str, model: str, key: str, headers: Sequence[tuple[bytes, bytes]]
    ) -> Iterator[Span]:
        """The span of one admin action (load, unload, sleep, wake, adapters); current while
        it runs, so a swap it causes nests under it."""
        with self.tracer.start_as_current_span(
            f"gateway.admin.{action}",
            context=_client_context(headers),
            kind=SpanKind.SERVER,
            attributes={"vllm_gateway.model": model, "vllm_gateway.key": key},
        ) as span:
            yield span

    def shutdown(self) -> None:
        """Export what is queued (bounded in time) and stop the export thread. Blocking: the
        lifespan runs it in a thread."""
        self.provider.shutdown()


class RequestTrace:
    """One request's spans. The relay calls it at its hook points; nothing here raises into
    the relay, and a span that is not sampled records nothing."""

    __slots__ = ("asked", "attempt", "attempts", "span", "tracer")

    def __init__(self, tracer: trace.Tracer, span: Span) -> None:
        self.tracer = tracer
        self.span = span
        self.attempt: Span | None = None  # the upstream attempt in progress, or the answered one
        self.attempts = 0
        self.asked: str | None = None  # the `model` the client named (maybe an alias)

    @contextlib.contextmanager
    def waiting(self, model: Startable) -> Iterator[None]:
        """Around the wait for an on-demand model: a span only when it is not serving yet.
        The span is current meanwhile, so the swap this start causes nests under it."""
        if model.serving or not self.span.is_recording():
            yield
            return
        with self.tracer.start_as_current_span(
            "gateway.wait_for_model",
            context=trace.set_span_in_context(self.span),
            attributes={"vllm_gateway.model": model.name, "vllm_gateway.model.state": model.state},
        ):
            yield

    def start_attempt(self, replica: Replica) -> list[tuple[bytes, bytes]]:
        """A new upstream attempt's span; the `traceparent` (and `tracestate`) that point the
        backend at it, in place of the client's."""
        self.attempts += 1
        if not self.span.is_recording():  # not sampled: no spans, only what vLLM must know
            return _traceparent(self.span.get_span_context())
        span = self.attempt = self.tracer.start_span(
            "gateway.upstream_attempt",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={"vllm_gateway.attempt": self.attempts, "server.address": replica.url},
        )
        return _traceparent(span.get_span_context())

    def attempt_failed(self, error: GatewayError) -> None:
        """The attempt in progress could not reach its replica; the relay tries another."""
        if self.attempt is not None:
            self.attempt.set_attribute("error.type", error.code or type(error).__name__)
            self.attempt.set_attribute("vllm_gateway.attempt.retried", True)
            self.attempt.set_status(Status(StatusCode.ERROR, str(error)))
            self.attempt.end()
            self.attempt = None

    def fell_back(self, move: FallbackMove) -> None:
        """The request leaves its model for another: the attempt in progress ends, saying
        why, and the request's span notes the move."""
        if self.attempt is not None:
            self.attempt.set_attribute("vllm_gateway.fallback.reason", move.reason)
            self.attempt.end()
            self.attempt = None
        attributes = {"vllm_gateway.model": move.model, "vllm_gateway.fallback.to": move.to}
        self.span.add_event("fallback", {**attributes, "vllm_gateway.fallback.reason": move.reason})

    def answered(self, status: int) -> None:
        """The backend sent its status and headers: its first byte."""
        if self.attempt is not None:
            self.attempt.set_attribute("http.response.status_code", status)
            self.attempt.add_event("first_byte")

    def first_byte(self) -> None:
        """The first body bytes went to the client."""
        self.span.add_event("first_byte_sent")

    def finish(self, record: RequestRecord) -> None:
        """The request is done, whichever way: its attributes from the record, then the end."""
        span = self.span
        if span.is_recording():
            span.set_attributes(_attributes(record, self.asked))
            if record.status >= 500 or record.error is not None:
                span.set_status(Status(StatusCode.ERROR, record.error or str(record.status)))
        if self.attempt is not None:
            if record.error is not None:
                self.attempt.set_attribute("error.type", record.error)
                self.attempt.set_status(Status(StatusCode.ERROR, record.error))
            self.attempt.end()
        span.end()


def _attributes(record: RequestRecord, asked: str | None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "http.response.status_code": record.status,
        "gen_ai.response.model": record.model,
        "vllm_gateway.key": record.key,
        "vllm_gateway.stream": record.stream,
        "vllm_gateway.replica": record.backend,
        "vllm_gateway.request_id": record.request_id,
    }
    if asked is not None:
        found["gen_ai.request.model"] = asked
    if record.usage is not None:
        found["gen_ai.usage.input_tokens"], found["gen_ai.usage.output_tokens"] = record.usage
    if record.error is not None:
        found["error.type"] = record.error
    if record.start_wait is not None:
        found["vllm_gateway.start_wait_s"] = record.start_wait
    return found


def _traceparent(ctx: SpanContext) -> list[tuple[bytes, bytes]]:
    """W3C trace context headers naming the span of ``ctx`` (one of an unsampled trace is
    not recorded, but its flags still tell vLLM not to record its own)."""
    headers = [
        (b"traceparent", b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags))
    ]
    if ctx.trace_state:
        headers.append((b"tracestate", ctx.trace_state.to_header().encode("latin-1")))
    return headers


def _client_context(headers: Sequence[tuple[bytes, bytes]]) -> Context | None:
    """The client's trace context (W3C `traceparent`, `tracestate`), if it sent one."""
    carrier = {}
    for name, value in headers:
        lower = name.lower()
        if lower in TRACE_HEADERS:
            carrier[lower.decode()] = value.decode("latin-1")
    return _PROPAGATOR.extract(carrier) if carrier else None


def otlp_exporter(settings: TracingSettings) -> SpanExporter:
    headers = settings.header_values() or None
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        insecure = settings.url.startswith("http://")
        return GrpcExporter(
            endpoint=settings.url, insecure=insecure, headers=headers, timeout=EXPORT_TIMEOUT
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=settings.url, headers=headers, timeout=EXPORT_TIMEOUT)


class _CountingExporter(SpanExporter):
    """Counts what was exported and what failed (runs in the SDK's export thread)."""

    def __init__(self, inner: SpanExporter, counts: SpanCounts) -> None:
        self.inner = inner
        self.counts = counts
        self.taken = 0  # spans handed to export so far: the queue holds queued - taken

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        result = self.inner.export(spans)
        if result is SpanExportResult.SUCCESS:
            self.counts.exported += len(spans)
        else:
            self.counts.export_failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _BoundedBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, with its drops counted: a span that would not fit in the
    queue is dropped here (and counted) rather than by the SDK (which only logs)."""

    def __init__(self, exporter: _CountingExporter, counts: SpanCounts) -> None:
        super().__init__(
            exporter,
            max_queue_size=MAX_QUEUE,
            max_export_batch_size=BATCH,
            schedule_delay_millis=EXPORT_EVERY_MS,
        )
        self.exporter = exporter
        self.counts = counts
        self.queued = 0  # spans put in the queue so far (the event loop's thread only)

    def on_end(self, span: ReadableSpan) -> None:
        if not (span.context and span.context.trace_flags.sampled):
            return
        if self.queued - self.exporter.taken >= MAX_QUEUE:
            self.counts.queue_full += 1
            return
        self.queued += 1
        super().on_end(span)
