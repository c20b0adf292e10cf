"""The gateway's span export never waits for a collector: what does not fit is dropped and
counted. An exporter held by the test stands in for a collector that does not answer."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from gateway.record import RequestRecord
from gateway.tracing import MAX_QUEUE, Tracing
from gateway.tracing_settings import TracingSettings

SETTINGS = TracingSettings(otlp_endpoint="http://127.0.0.1:9")


class HeldExporter(SpanExporter):
    """Takes its first batch, then holds the export thread until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.holding.set()
        self.release.wait(30)
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def test_spans_past_a_full_queue_are_dropped_and_counted_and_the_rest_exported() -> None:
    exporter = HeldExporter()
    tracing = Tracing(SETTINGS, exporter=exporter)
    ended = 3 * MAX_QUEUE
    try:
        for i in range(ended):  # no call here waits: the exporter is held meanwhile
            tracing.tracer.start_span(f"span {i}").end()
            if i == 0:
                assert exporter.holding.wait(30)  # the export thread is stuck from here on
        assert tracing.counts.queue_full >= ended - 1 - MAX_QUEUE
    finally:
        exporter.release.set()
        tracing.shutdown()
    assert tracing.counts.exported == exporter.spans == ended - tracing.counts.queue_full
    assert tracing.counts.export_failed == 0


class FailingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.FAILURE


def test_spans_a_collector_refused_are_counted_as_failed_exports() -> None:
    tracing = Tracing(SETTINGS, exporter=FailingExporter())
    for i in range(5):
        tracing.tracer.start_span(f"span {i}").end()
    tracing.shutdown()
    assert (tracing.counts.export_failed, tracing.counts.exported) == (5, 0)


class KeptExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += spans
        return SpanExportResult.SUCCESS


def test_a_malformed_client_traceparent_starts_a_new_trace() -> None:
    exporter = KeptExporter()
    tracing = Tracing(SETTINGS, exporter=exporter)
    headers = [(b"Traceparent", b"00-not-a-trace-01"), (b"content-type", b"application/json")]
    trace = tracing.request({"method": "POST", "path": "/v1/chat/completions", "headers": headers})
    trace.finish(RequestRecord("r1", "/v1/chat/completions", status=200))
    tracing.shutdown()
    (span,) = exporter.spans
    assert span.parent is None and span.context.trace_id != 0
