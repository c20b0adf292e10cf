"""A real OTLP/HTTP trace receiver for tests: what a collector would get, decoded.

An HTTP server on loopback takes ``POST /v1/traces`` (protobuf, maybe gzipped), and a gRPC
server takes OTLP's TraceService calls; each ``ExportTraceServiceRequest`` is decoded with
opentelemetry-proto and its spans kept, flattened with their resource's ``service.name``.
The gateway and real vLLM servers export to the same one.
"""

from __future__ import annotations

import gzip
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from backends.process import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str  # hex, as in a traceparent
    span_id: str
    parent_id: str  # "" for a root span
    kind: int  # opentelemetry.proto's Span.SpanKind (2: server, 3: client)
    attributes: dict[str, Any]
    events: tuple[str, ...]
    status_code: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int


class OtlpReceiver:
    """Started on free ports; ``url`` is the OTLP/HTTP endpoint to export to, ``grpc_url``
    the OTLP/gRPC one (the same spans end up in ``spans``)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1/traces"
        self.grpc = grpc.server(ThreadPoolExecutor(2))
        add_TraceServiceServicer_to_server(_GrpcTraces(self), self.grpc)
        self.grpc_url = f"http://127.0.0.1:{self.grpc.add_insecure_port('127.0.0.1:0')}"
        self.grpc.start()
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest.FromString(body)
                receiver.add(request)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: the test's output is the spans

        return Handler

    def add(self, request: ExportTraceServiceRequest) -> None:
        found = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes=_attributes(span.attributes),
                            events=tuple(e.name for e in span.events),
                            status_code=span.status.code,
                            start_ns=span.start_time_unix_nano,
                            end_ns=span.end_time_unix_nano,
                        )
                    )
        with self.changed:
            self.requests += 1
            self.spans.extend(found)
            self.changed.notify_all()

    def wait_for(self, condition: Any, timeout: float, what: str) -> list[ReceivedSpan]:
        """Block until ``condition(spans)`` holds (every export wakes the check); the spans."""
        with self.changed:
            if not self.changed.wait_for(lambda: condition(self.spans), timeout):
                names = sorted({(s.service, s.name) for s in self.spans})
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; got {names}")
            return list(self.spans)

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.changed:
            return [s for s in self.spans if s.trace_id == trace_id]

    def clear(self) -> None:
        with self.changed:
            self.spans.clear()

    def close(self) -> None:
        self.grpc.stop(grace=None)
        self.server.shutdown()
        self.server.server_close()


class _GrpcTraces(TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: ExportTraceServiceRequest, context: Any) -> Any:
        self.receiver.add(request)
        return ExportTraceServiceResponse()


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which) if which else None
