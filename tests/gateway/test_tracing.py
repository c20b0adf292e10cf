"""Traces against the fakes: a real uvicorn gateway exporting to the session's OTLP receiver.

The fakes provoke what real vLLM cannot be made to do on demand (a refused connection and its
retry, a swap, a collector that is down). vLLM's own spans nesting under the gateway's are in
tests/integration/test_tracing.py. Each gateway here has a service name of its own, so tests
sharing the receiver read only their spans.
"""

from __future__ import annotations

import itertools
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.process import free_port
from backends.supervisor import Supervisor
from gateway.specs import backend_specs, on_demand_names
from tests.gateway.test_on_demand_spawn import on_demand_model
from tests.helpers import FAST_SPAWN, wait_until
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.servers import FAKE_VLLM, FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEY = "sk-tracing"
ADMIN = "sk-tracing-admin"
KEYS = [{"name": "tracer", "key": KEY}, {"name": "ops", "key": ADMIN, "admin": True}]
SERVER_SPAN = "POST /v1/chat/completions"
_services = itertools.count()


def tracing(otlp: OtlpReceiver, **extra: Any) -> dict[str, Any]:
    """A `tracing:` section with a service name no other test uses."""
    return {"otlp_endpoint": otlp.url, "service_name": f"gw-{next(_services)}", **extra}


def chat(url: str, model: str = "chat", key: str = KEY, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [], **extra}
    return httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )


def of(service: str, otlp: OtlpReceiver, names: list[str], what: str) -> list[ReceivedSpan]:
    """Once each of ``names`` arrived from ``service``: that service's spans."""

    def arrived(spans: list[ReceivedSpan]) -> bool:
        seen = [s.name for s in spans if s.service == service]
        return all(seen.count(n) >= names.count(n) for n in set(names))

    return [s for s in otlp.wait_for(arrived, 15, what) if s.service == service]


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


@pytest.fixture
def fake_chat() -> Iterator[FakeBackend]:
    backend = FakeBackend("fake-chat", "--chunks", "4")
    yield backend
    backend.close()


def test_a_chat_is_a_server_span_whose_attempt_the_backend_is_pointed_at(
    otlp: OtlpReceiver, fake_chat: FakeBackend
) -> None:
    section = tracing(otlp)
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    try:
        echoed = chat(gateway.url, fake={"echo_headers": True})
        assert echoed.status_code == 200
        sent = echoed.json()["headers"]["traceparent"]
        spans = of(section["service_name"], otlp, [SERVER_SPAN, "gateway.upstream_attempt"], "")
    finally:
        gateway.close()
    server = next(s for s in spans if s.name == SERVER_SPAN)
    attempt = next(s for s in spans if s.name == "gateway.upstream_attempt")
    assert sent.startswith(f"00-{server.trace_id}-{attempt.span_id}-")
    assert int(sent[-2:], 16) & 1  # sampled (the SDK also sets W3C's "random" bit, 2)
    assert server.parent_id == "" and attempt.parent_id == server.span_id  # a new trace
    assert server.kind == 2 and attempt.kind == 3  # server, client
    assert server.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.request.model": "chat",  # the alias the client named
        "gen_ai.response.model": "fake-chat",
        "vllm_gateway.key": "tracer",  # the key's name, never the key
        "vllm_gateway.stream": False,
        "vllm_gateway.replica": fake_chat.url,
        "vllm_gateway.request_id": echoed.headers["x-request-id"],
    }
    assert attempt.attributes["vllm_gateway.attempt"] == 1
    assert attempt.attributes["http.response.status_code"] == 200
    assert "first_byte" in attempt.events and "first_byte_sent" in server.events
    assert KEY not in repr(spans)


def test_grpc_exports_the_same_spans(otlp: OtlpReceiver, fake_chat: FakeBackend) -> None:
    section = tracing(otlp, otlp_endpoint=otlp.grpc_url, protocol="grpc")
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    try:
        assert chat(gateway.url).status_code == 200
        spans = of(section["service_name"], otlp, [SERVER_SPAN, "gateway.upstream_attempt"], "")
    finally:
        gateway.close()
    server = next(s for s in spans if s.name == SERVER_SPAN)
    assert server.attributes["http.response.status_code"] == 200


def test_a_clients_traceparent_is_continued_and_replaced_on_the_way_up(
    otlp: OtlpReceiver, fake_chat: FakeBackend
) -> None:
    section = tracing(otlp)
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    header, trace_id, client_span = traceparent()
    try:
        body = {"model": "chat", "messages": [], "fake": {"echo_headers": True}}
        headers = {"Authorization": f"Bearer {KEY}", "traceparent": header}
        echoed = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers)
        spans = of(section["service_name"], otlp, [SERVER_SPAN, "gateway.upstream_attempt"], "")
    finally:
        gateway.close()
    server = next(s for s in spans if s.name == SERVER_SPAN)
    attempt = next(s for s in spans if s.name == "gateway.upstream_attempt")
    assert server.trace_id == trace_id and server.parent_id == client_span
    assert echoed.json()["headers"]["traceparent"].startswith(f"00-{trace_id}-{attempt.span_id}-")


def test_a_stream_carries_its_token_counts(otlp: OtlpReceiver, fake_chat: FakeBackend) -> None:
    section = tracing(otlp)
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    try:
        streamed = chat(gateway.url, stream=True, stream_options={"include_usage": True})
        assert streamed.status_code == 200
        spans = of(section["service_name"], otlp, [SERVER_SPAN], "the stream's span")
        (server,) = [s for s in spans if s.name == SERVER_SPAN]
    finally:
        gateway.close()
    assert server.attributes["vllm_gateway.stream"] is True
    assert server.attributes["gen_ai.usage.input_tokens"] == 8
    assert server.attributes["gen_ai.usage.output_tokens"] == 4


def test_a_refused_connection_is_an_attempt_span_and_its_retry_another(
    otlp: OtlpReceiver, fake_chat: FakeBackend
) -> None:
    """Nothing listens on the first replica's port; health checks are too slow to notice
    before the requests, so some go there first and are retried on the fake."""
    section = tracing(otlp)
    dead = f"http://127.0.0.1:{free_port()}"
    models = [{"name": "fake-chat", "aliases": ["chat"], "urls": [dead, fake_chat.url]}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    try:
        assert [chat(gateway.url).status_code for _ in range(4)] == [200] * 4
        spans = of(section["service_name"], otlp, [SERVER_SPAN] * 4, "four requests")
        attempts = [s for s in spans if s.name == "gateway.upstream_attempt"]
        retried = [s for s in attempts if s.attributes.get("vllm_gateway.attempt.retried")]
        assert retried, "no request went to the dead replica first"
        (failed,) = retried[:1]
        then = [s for s in attempts if s.parent_id == failed.parent_id and s is not failed]
    finally:
        gateway.close()
    assert failed.attributes["server.address"] == dead and failed.status_code == 2  # error
    assert failed.attributes["error.type"] == "backend_unavailable"
    assert [
        (s.attributes["vllm_gateway.attempt"], s.attributes["server.address"]) for s in then
    ] == [(2, fake_chat.url)]
    server = next(s for s in spans if s.span_id == failed.parent_id)
    assert server.attributes["http.response.status_code"] == 200 and server.status_code == 0


def test_sampling_at_zero_exports_nothing_yet_the_backend_gets_a_traceparent(
    otlp: OtlpReceiver, fake_chat: FakeBackend
) -> None:
    section = tracing(otlp, sample_ratio=0)
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    try:
        echoed = [chat(gateway.url, fake={"echo_headers": True}) for _ in range(5)]
    finally:
        gateway.close()  # the lifespan's end exports whatever was queued
    parents = [r.json()["headers"]["traceparent"] for r in echoed]
    assert all(p.startswith("00-") and not int(p[-2:], 16) & 1 for p in parents)  # unsampled
    assert len({p.split("-")[1] for p in parents}) == 5  # a trace id each, all the same
    assert not [
        s for s in otlp.wait_for(lambda _: True, 1, "-") if s.service == section["service_name"]
    ]


def test_a_collector_that_is_down_costs_no_request_and_its_drops_are_counted(
    fake_chat: FakeBackend,
) -> None:
    section = {"otlp_endpoint": f"http://127.0.0.1:{free_port()}", "service_name": "gw-down"}
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS, tracing=section))
    try:
        assert [chat(gateway.url).status_code for _ in range(20)] == [200] * 20
        wait_until(
            lambda: dropped(gateway.url) >= 20, 30, "the failed exports to be counted", every=0.2
        )
        assert exported(gateway.url) == 0
        assert chat(gateway.url).status_code == 200
    finally:
        gateway.close()


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text


def dropped(url: str) -> float:
    line = 'vllm_gateway_trace_spans_dropped_total{reason="export_failed"} '
    return float(next(x for x in metrics(url).splitlines() if x.startswith(line)).split()[-1])


def exported(url: str) -> float:
    line = "vllm_gateway_trace_spans_exported_total "
    return float(next(x for x in metrics(url).splitlines() if x.startswith(line)).split()[-1])


def test_without_tracing_the_backend_gets_the_clients_traceparent_unchanged(
    fake_chat: FakeBackend,
) -> None:
    models = [{"name": "fake-chat", "aliases": ["chat"], "url": fake_chat.url}]
    gateway = GatewayServer(gateway_settings(models, api_keys=KEYS))
    header, _, _ = traceparent()
    try:
        body = {"model": "chat", "messages": [], "fake": {"echo_headers": True}}
        headers = {"Authorization": f"Bearer {KEY}", "traceparent": header, "tracestate": "a=1"}
        echoed = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers)
        assert "vllm_gateway_trace_spans" not in metrics(gateway.url)
    finally:
        gateway.close()
    assert echoed.json()["headers"]["traceparent"] == header
    assert echoed.json()["headers"]["tracestate"] == "a=1"


class TracedOnDemand:
    """Two on-demand fakes that cannot share GPU 0, spawned as real servers are, traced."""

    def __init__(self, tmp_path: Path, otlp: OtlpReceiver) -> None:
        self.section = tracing(otlp)
        settings = gateway_settings(
            [on_demand_model("a", **{"startup-delay": 0.3}), on_demand_model("b")],
            launcher=[sys.executable, FAKE_VLLM],
            log_dir=str(tmp_path),
            api_keys=KEYS,
            tracing=self.section,
            swaps={"batch_window": 0},  # b's first request swaps at once (no batching for a)
        )
        supervisor = Supervisor(
            backend_specs(settings),
            log_dir=tmp_path,
            timings=FAST_SPAWN,
            on_demand=on_demand_names(settings),
        )
        self.server = GatewayServer(settings, supervisor=supervisor)
        self.url = self.server.url


@pytest.fixture
def on_demand(tmp_path: Path, otlp: OtlpReceiver) -> Iterator[TracedOnDemand]:
    gateway = TracedOnDemand(tmp_path, otlp)
    yield gateway
    gateway.server.close()


def test_an_on_demand_start_is_a_wait_span_and_a_swap_nests_under_the_next_wait(
    on_demand: TracedOnDemand, otlp: OtlpReceiver
) -> None:
    assert chat(on_demand.url, "a").status_code == 200  # starts a
    assert chat(on_demand.url, "a").status_code == 200  # a serves: no wait
    assert chat(on_demand.url, "b").status_code == 200  # a makes room for b
    service = on_demand.section["service_name"]
    spans = of(service, otlp, [SERVER_SPAN] * 3 + ["backends.swap"], "three chats, one swap")
    servers = sorted((s for s in spans if s.name == SERVER_SPAN), key=lambda s: s.start_ns)
    waits = [s for s in spans if s.name == "gateway.wait_for_model"]
    (swap,) = [s for s in spans if s.name == "backends.swap"]
    assert [w.parent_id for w in waits] == [servers[0].span_id, servers[2].span_id]
    assert [w.attributes["vllm_gateway.model"] for w in waits] == ["a", "b"]
    assert all(w.attributes["vllm_gateway.model.state"] == "stopped" for w in waits)
    assert servers[0].attributes["vllm_gateway.start_wait_s"] > 0.3
    assert swap.parent_id == waits[1].span_id and swap.trace_id == servers[2].trace_id
    assert swap.attributes["vllm_gateway.model"] == "b"
    assert swap.attributes["vllm_gateway.swap.unloaded"] == ["a"]


def test_admin_actions_are_spans_with_their_result(
    on_demand: TracedOnDemand, otlp: OtlpReceiver
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{on_demand.url}/admin/models/a/load", headers=headers).status_code == 200
    assert httpx.post(f"{on_demand.url}/admin/models/a/unload", headers=headers).status_code == 200
    service = on_demand.section["service_name"]
    spans = of(service, otlp, ["gateway.admin.load", "gateway.admin.unload"], "two actions")
    results = {
        s.name: (s.attributes["vllm_gateway.admin.result"], s.attributes["vllm_gateway.key"])
        for s in spans
    }
    assert results == {
        "gateway.admin.load": ("ready", "ops"),
        "gateway.admin.unload": ("stopped", "ops"),
    }
