"""/metrics: what an ops dashboard reads, checked after real requests through the gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.record import RequestRecord
from tests.helpers import bearer
from tests.servers import FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEYS = [{"name": "team-a", "key": "sk-a"}, {"name": "ops", "key": "sk-ops", "monitor": True}]


def scrape(gateway: GatewayServer) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{gateway.url}/metrics", headers=bearer("sk-ops")).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def gateway(fake: FakeBackend) -> Iterator[GatewayServer]:
    models = [{"name": fake.name, "aliases": ["chat"], "url": fake.url}]
    server = GatewayServer(gateway_settings(models, api_keys=KEYS, stream_usage="always"))
    yield server
    server.close()


def chat(stream: bool, **extra: object) -> dict[str, object]:
    return {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


def test_requests_without_a_valid_key_are_counted(gateway: GatewayServer) -> None:
    """A key being guessed shows on the dashboard; any path may be asked for, the label set
    stays bounded."""
    for path, key in [("/v1/chat/completions", "sk-wrong"), ("/v1/x-1", "sk-a"), ("/v1/x-2", "")]:
        headers = bearer(key) if key else {}
        response = httpx.post(f"{gateway.url}{path}", json=chat(False), headers=headers)
        assert response.status_code == (404 if key == "sk-a" else 401)
    samples = scrape(gateway)
    refused = {"model": "-", "status": "401"}
    assert (
        value(samples, "vllm_gateway_requests_total", endpoint="/v1/chat/completions", **refused)
        == 1
    )
    assert value(samples, "vllm_gateway_requests_total", endpoint="other", **refused) == 1
    assert not [labels for name, labels in samples if ("endpoint", "/v1/x-2") in labels]


def test_requests_tokens_and_backend_state_are_counted(gateway: GatewayServer) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    assert httpx.post(url, json=chat(False), headers=bearer("sk-a")).status_code == 200
    with_usage = chat(True, stream_options={"include_usage": True})
    assert httpx.post(url, json=with_usage, headers=bearer("sk-a")).status_code == 200
    assert httpx.post(url, json=chat(True), headers=bearer("sk-a")).status_code == 200
    assert httpx.post(url, json={"model": "gpt-4"}, headers=bearer("sk-a")).status_code == 404
    assert httpx.get(f"{gateway.url}/v1/models", headers=bearer("sk-a")).status_code == 200

    samples = scrape(gateway)
    requests = "vllm_gateway_requests_total"
    ok = {"model": "fake-chat", "endpoint": "/v1/chat/completions"}
    assert value(samples, requests, **ok, status="200") == 3
    assert value(samples, requests, **{**ok, "model": "-"}, status="404") == 1
    tokens = "vllm_gateway_tokens_total"
    # 8 prompt and 8 completion tokens each, the stream without include_usage included
    assert value(samples, tokens, model="fake-chat", key="team-a", kind="completion") == 24
    assert value(samples, tokens, model="fake-chat", key="team-a", kind="prompt") == 24
    ttfb = "vllm_gateway_time_to_first_byte_seconds_count"
    assert value(samples, ttfb, model="fake-chat", endpoint=ok["endpoint"], stream="true") == 2
    state = "vllm_gateway_backend_state"
    assert value(samples, state, model="fake-chat", replica="0", state="ready") == 1
    assert value(samples, state, model="fake-chat", replica="0", state="failed") == 0
    assert value(samples, "vllm_gateway_requests_in_flight", model="fake-chat") == 0
    assert value(samples, "vllm_gateway_open_streams", model="fake-chat") == 0
    control = "http_requests_total"  # prometheus-fastapi-instrumentator, on the control API
    assert value(samples, control, handler="/v1/models", method="GET", status="2xx") == 1


def test_a_stream_that_did_not_ask_for_usage_gets_none(
    gateway: GatewayServer, fake: FakeBackend
) -> None:
    """With stream_usage: always, the gateway asks for usage on the client's behalf and
    removes just that one event."""
    url = f"{gateway.url}/v1/chat/completions"
    via = httpx.post(url, json=chat(True), headers=bearer("sk-a")).text
    direct = httpx.post(
        f"{fake.url}/v1/chat/completions", json={**chat(True), "model": "fake-chat"}
    ).text
    assert '"usage"' not in via
    assert via.count("data: ") == direct.count("data: ") == 9
    strip = lambda text: [e.split('"created":')[0] for e in text.split("\n\n")]  # noqa: E731
    assert strip(via) == strip(direct)


def test_metrics_need_a_key_unless_opened(fake: FakeBackend) -> None:
    models = [{"name": fake.name, "url": fake.url}]
    closed = GatewayServer(gateway_settings(models, api_keys=KEYS))
    opened = GatewayServer(gateway_settings(models, api_keys=KEYS, open_endpoints=["metrics"]))
    try:
        assert httpx.get(f"{closed.url}/metrics").status_code == 401
        assert httpx.get(f"{opened.url}/metrics").status_code == 200
        assert httpx.get(f"{opened.url}/status.json").status_code == 401
    finally:
        closed.close()
        opened.close()


def test_histogram_buckets_count_values_up_to_and_including_their_bound() -> None:
    metrics = GatewayMetrics([])
    for seconds in (0.005, 0.0051, 400.0):
        record = RequestRecord("id", "/v1/embeddings", key="k", model="m", status=200)
        metrics.observe(record, seconds)
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("vllm_gateway_request_duration_seconds")
    }
    name = "vllm_gateway_request_duration_seconds"
    assert samples[(f"{name}_bucket", "0.005")] == 1
    assert samples[(f"{name}_bucket", "0.01")] == 2
    assert samples[(f"{name}_bucket", "300.0")] == 2
    assert samples[(f"{name}_bucket", "+Inf")] == samples[(f"{name}_count", None)] == 3
    assert samples[(f"{name}_sum", None)] == pytest.approx(400.0101)
