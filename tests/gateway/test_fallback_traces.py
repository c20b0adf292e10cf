"""A request that falls back, traced: each model's attempt is a span that ends as the request
leaves it (saying why), and the request's span has an event for each move, names the model
asked for and the one that answered. The relay in-process, spans kept in memory."""

from __future__ import annotations

import orjson
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from backends.pool import Replica, ReplicaPool
from gateway.boundary import ErrorBoundary
from gateway.inprocess import InProcessUpstreams, Reply, refused, script
from gateway.relay import Relay, RelayLimits
from gateway.routing import RouteTable
from gateway.telemetry import Telemetry
from gateway.tracing import Tracing
from gateway.tracing_settings import TracingSettings
from gateway.traffic.plan import Deadlines, Fallbacks, TrafficPlan
from gateway.traffic.settings import REASONS
from tests.gateway.asgi import Call

BIG, MID, SMALL = "http://big.test", "http://mid.test", "http://small.test"


async def test_each_model_tried_is_an_ended_attempt_and_each_move_an_event() -> None:
    exporter = InMemorySpanExporter()
    tracing = Tracing(TracingSettings(otlp_endpoint="http://127.0.0.1:9"), exporter=exporter)
    pools = [ReplicaPool(name, [Replica(url=url)]) for name, url in
             (("big", BIG), ("mid", MID), ("small", SMALL))]  # fmt: skip
    busy = Reply.json({"error": {"message": "busy", "code": 429}}, 429)
    upstreams = InProcessUpstreams(
        {BIG: refused(), MID: script(busy), SMALL: script(Reply.json({"model": "small"}))}
    )
    chain = Fallbacks(("mid", "small"), frozenset(REASONS))
    plan = TrafficPlan(Deadlines(None, 60, 60), fallbacks={"big": chain})
    relay = Relay(
        RouteTable([(p, []) for p in pools]),
        upstreams,
        RelayLimits(1 << 20, 60, 60, traffic=plan),
        Telemetry(pools, tracing=tracing),
    )
    call = await Call(ErrorBoundary(relay), body=orjson.dumps({"model": "big"})).done()
    assert call.status == 200
    tracing.shutdown()
    spans = exporter.get_finished_spans()
    attempts = [s for s in spans if s.name == "gateway.upstream_attempt"]
    assert [s.attributes["server.address"] for s in attempts] == [BIG, MID, SMALL]  # type: ignore[index]
    assert [s.attributes.get("vllm_gateway.fallback.reason") for s in attempts] == [  # type: ignore[union-attr]
        "unavailable",
        "overloaded",
        None,
    ]
    (request,) = [s for s in spans if s.name == "POST /v1/chat/completions"]
    moves = [dict(e.attributes or {}) for e in request.events if e.name == "fallback"]
    assert [(m["vllm_gateway.model"], m["vllm_gateway.fallback.to"]) for m in moves] == [
        ("big", "mid"),
        ("mid", "small"),
    ]
    assert request.attributes["gen_ai.request.model"] == "big"  # type: ignore[index]
    assert request.attributes["gen_ai.response.model"] == "small"  # type: ignore[index]
