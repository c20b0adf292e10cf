"""CPU time of one request's spans, without a network: the relay's hook calls in a loop.

    .venv/bin/python load/tracing_spans.py [--requests 5000]

Measured as thread CPU time (``time.thread_time``), not wall time, so a busy machine inflates
it less: the event loop's share (the spans a request makes, as the relay makes them) and the
export thread's (OTLP protobuf encoding of those spans; the HTTP post is not included). The
exporter here only encodes; load/tracing_cost.py measures whole gateways.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from backends.pool import Replica
from gateway.record import RequestRecord
from gateway.tracing import Tracing
from gateway.tracing_settings import TracingSettings

SCOPE = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "headers": [(b"host", b"gw"), (b"content-type", b"application/json")],
}


class EncodingExporter(SpanExporter):
    def __init__(self) -> None:
        self.seconds = 0.0
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        began = time.thread_time()
        encode_spans(spans).SerializePartialToString()
        self.seconds += time.thread_time() - began
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def measure(ratio: float, requests: int) -> tuple[float, float, int]:
    exporter = EncodingExporter()
    settings = TracingSettings(otlp_endpoint="http://127.0.0.1:9", sample_ratio=ratio)
    tracing = Tracing(settings, exporter=exporter)
    replica = Replica(url="http://127.0.0.1:8000")
    began = time.thread_time()
    for _ in range(requests):
        record = RequestRecord("0123456789abcdef", "/v1/chat/completions")
        trace = tracing.request(SCOPE)
        trace.asked = "chat"
        trace.start_attempt(replica)
        trace.answered(200)
        trace.first_byte()
        record.status, record.model, record.usage = 200, "chat", (8, 4)
        trace.finish(record)
    loop = (time.thread_time() - began) / requests
    tracing.shutdown()
    return loop, exporter.seconds / requests, exporter.spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=5000)
    args = parser.parse_args()
    print("| sample_ratio | event loop µs/request | encoding µs/request | spans exported |")
    print("|---|---|---|---|")
    for ratio in (1.0, 0.0):
        loop, encoding, spans = measure(ratio, args.requests)
        print(f"| {ratio:g} | {loop * 1e6:.1f} | {encoding * 1e6:.1f} | {spans} |")


if __name__ == "__main__":
    main()
