"""Traces with real vLLM: a spawn-mode gateway with `tracing.backends: true` starts one tiny
chat server on demand; both export to the session's OTLP receiver (tests/otlp_receiver.py).

One trace per request: the gateway's server span, its wait for the on-demand start, its
upstream attempt, and vLLM's own `llm_request` span as the attempt's child (vLLM continued the
`traceparent` the gateway sent). Retries, admin actions and swaps are shown against the fakes
in tests/gateway/test_tracing.py.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.process import free_port
from gateway.config_file import settings_from_dict
from tests.helpers import wait_until
from tests.integration.spawned import AUTH, vllm_servers
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.servers import GatewayProcess, GatewayServer
from tests.vllm_rig import ARTIFACTS, CPU_ARGS, MODELS_DIR, cpu_env

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

START_TIMEOUT = 280.0
GATEWAY = "traced-gateway"  # the spawn-mode gateway's service.name
UNSAMPLED = "unsampled-gateway"


@pytest.fixture(scope="module")
def traced(otlp: OtlpReceiver, rig_stopped: None) -> Iterator[GatewayProcess]:
    config = {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "spawned-traced"),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "tracing": {"otlp_endpoint": otlp.url, "backends": True, "service_name": GATEWAY},
        "models": [
            {
                "name": "traced-chat",
                "vllm": {
                    "model": str(MODELS_DIR / "chat"),
                    "args": {**CPU_ARGS, "max-model-len": 512},
                    "env": cpu_env(1),
                },
                "on_demand": {"start_timeout": START_TIMEOUT, "idle_ttl": 600},
            }
        ],
    }
    server = GatewayProcess(config, ARTIFACTS)
    yield server
    server.close()


def new_traceparent() -> tuple[str, str, str]:
    """A client's sampled W3C traceparent: (header, trace id, span id)."""
    trace_id, span_id = f"{random.getrandbits(128):032x}", f"{random.getrandbits(64):016x}"
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def chat(url: str, headers: dict[str, str], timeout: float = 60) -> httpx.Response:
    body = {"model": "traced-chat", "messages": [{"role": "user", "content": "hi"}]}
    body["max_tokens"] = 4  # type: ignore[assignment]
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def has_vllm_span(trace_id: str) -> object:
    return lambda spans: any(s.trace_id == trace_id and s.service == "vllm" for s in spans)


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    (found,) = [s for s in spans if s.name == name]
    return found


def test_a_chat_is_one_trace_from_the_gateways_wait_down_to_vllms_own_span(
    traced: GatewayProcess, otlp: OtlpReceiver
) -> None:
    header, trace_id, client_span = new_traceparent()
    response = chat(traced.url, {**AUTH, "traceparent": header}, timeout=START_TIMEOUT + 20)
    assert response.status_code == 200
    otlp.wait_for(has_vllm_span(trace_id), 60, "vLLM's span of the first chat")
    spans = otlp.trace(trace_id)
    server = one(spans, "POST /v1/chat/completions")
    wait, attempt = one(spans, "gateway.wait_for_model"), one(spans, "gateway.upstream_attempt")
    vllm = one(spans, "llm_request")
    assert server.service == GATEWAY and server.parent_id == client_span  # continued
    assert wait.parent_id == attempt.parent_id == server.span_id
    assert wait.attributes["vllm_gateway.model.state"] == "stopped"  # an on-demand start
    assert vllm.parent_id == attempt.span_id  # vLLM continued the gateway's traceparent
    assert vllm.attributes["gen_ai.usage.completion_tokens"] == 4
    assert server.attributes["gen_ai.usage.output_tokens"] == 4
    assert server.attributes["gen_ai.response.model"] == "traced-chat"
    assert server.attributes["vllm_gateway.key"] == "ops"
    assert server.attributes["http.response.status_code"] == 200
    assert server.start_ns <= wait.start_ns < wait.end_ns <= attempt.start_ns
    assert attempt.start_ns <= vllm.start_ns and vllm.end_ns <= server.end_ns


def test_sampling_at_zero_exports_nothing_from_the_gateway_or_vllm(
    traced: GatewayProcess, otlp: OtlpReceiver
) -> None:
    """A second gateway, in connect mode in front of the same vLLM server, samples nothing:
    neither it nor vLLM (told by the traceparent's flags) exports a span for its requests."""
    header, trace_id, _ = new_traceparent()
    serving = chat(traced.url, {**AUTH, "traceparent": header}, timeout=START_TIMEOUT + 20)
    assert serving.status_code == 200
    spans = otlp.wait_for(has_vllm_span(trace_id), 60, "vLLM's span of a first chat")
    before = sum(s.name == "llm_request" for s in spans)
    unsampled = gateway_before(traced, {"sample_ratio": 0, "service_name": UNSAMPLED}, otlp.url)
    try:
        assert [chat(unsampled.url, {}).status_code for _ in range(3)] == [200] * 3
    finally:
        unsampled.close()  # its lifespan flushes whatever it had queued
    header, trace_id, _ = new_traceparent()
    assert chat(traced.url, {**AUTH, "traceparent": header}).status_code == 200
    spans = otlp.wait_for(has_vllm_span(trace_id), 60, "vLLM's span of the sampled chat")
    assert sum(s.name == "llm_request" for s in spans) == before + 1  # vLLM exports in order
    assert not [s for s in spans if s.service == UNSAMPLED]


def test_a_collector_that_is_down_loses_no_request(
    traced: GatewayProcess, otlp: OtlpReceiver
) -> None:
    """A gateway whose collector does not answer, in front of the same real vLLM server."""
    assert chat(traced.url, AUTH, timeout=START_TIMEOUT + 20).status_code == 200  # serving
    gateway = gateway_before(
        traced, {"service_name": "gw-no-collector"}, f"http://127.0.0.1:{free_port()}"
    )
    try:
        assert [chat(gateway.url, {}).status_code for _ in range(10)] == [200] * 10
        wait_until(lambda: failed_exports(gateway) >= 20, 60, "the failed exports", every=0.5)
        assert chat(gateway.url, {}).status_code == 200  # and it still serves
    finally:
        gateway.close()


def failed_exports(gateway: GatewayServer) -> float:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    line = 'vllm_gateway_trace_spans_dropped_total{reason="export_failed"} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).split()[-1])


def gateway_before(
    traced: GatewayProcess, tracing: dict[str, object], endpoint: str
) -> GatewayServer:
    """A connect-mode gateway in the test process, in front of the spawned vLLM server."""
    doc = httpx.get(f"{traced.url}/status.json", headers=AUTH, timeout=10).json()
    url = doc["models"][0]["replicas"][0]["url"]
    (server,) = vllm_servers(traced)
    environ = Path(f"/proc/{server}/environ").read_text().split("\0")
    # The key the supervisor gave it: by environment (a command line is public).
    backend_key = next(v.split("=", 1)[1] for v in environ if v.startswith("VLLM_API_KEY="))
    model = {"name": "traced-chat", "url": url, "api_key_env": "TRACED_KEY"}
    config = {
        "models": [model],
        "tracing": {"otlp_endpoint": endpoint, **tracing},
        "open_endpoints": ["metrics"],
    }
    return GatewayServer(settings_from_dict(config, env={"TRACED_KEY": backend_key}))
