"""/metrics stays bounded with many keys: requests are counted by model, endpoint and status,
and by key only where `metrics.requests_by_key` asks for it; tokens are counted by key always
(chargeback needs them). The series a scrape holds with 5,000 keys, before and after:
load/metrics_series.py."""

from __future__ import annotations

from pathlib import Path

import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import GatewayMetrics
from gateway.record import RequestRecord
from tests.gateway.test_fallbacks import BIG, KEYS, Gateway, answering
from tests.helpers import bearer


def finished(metrics: GatewayMetrics, key: str, status: int = 200) -> None:
    record = RequestRecord("id", "/v1/chat/completions", key=key, model="m", status=status)
    record.usage = (3, 5)
    metrics.observe(record, 0.1)


def series(metrics: GatewayMetrics, name: str) -> list[dict[str, str]]:
    text = generate_latest(metrics.registry).decode()
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_requests_are_counted_without_the_key_unless_asked_and_tokens_by_key_always() -> None:
    metrics = GatewayMetrics([])
    for key in ("team-a", "team-b", "team-c"):
        finished(metrics, key)
    assert series(metrics, "vllm_gateway_requests_total") == [
        {"model": "m", "endpoint": "/v1/chat/completions", "status": "200"}
    ]
    tokens = series(metrics, "vllm_gateway_tokens_total")
    assert sorted({labels["key"] for labels in tokens}) == ["team-a", "team-b", "team-c"]


def test_requests_by_key_adds_the_key_label_and_a_reload_may_take_it_away() -> None:
    metrics = GatewayMetrics([], requests_by_key=True)
    finished(metrics, "team-a")
    finished(metrics, "team-b", status=429)
    assert sorted(labels["key"] for labels in series(metrics, "vllm_gateway_requests_total")) == [
        "team-a",
        "team-b",
    ]
    metrics.requests_by_key = False  # a reload turned it off: the per-key series go
    assert [labels.get("key") for labels in series(metrics, "vllm_gateway_requests_total")] == [
        None,
        None,
    ]
    assert metrics.key_requests == {}


async def test_a_reload_turns_requests_by_key_on_in_place(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    keys = [*KEYS, {"name": "admin", "key": "sk-admin", "admin": True}]
    config = {"models": [{"name": "big", "url": BIG}], "api_keys": keys}
    path.write_text(yaml.safe_dump(config))
    gw = Gateway({BIG: answering("big")}, config_path=path, **config)
    try:
        assert (await gw.chat("big")).status_code == 200
        labels = {"model": "big", "endpoint": "/v1/chat/completions", "status": "200"}
        assert await gw.metric("vllm_gateway_requests_total", **labels) == 1
        path.write_text(yaml.safe_dump({**config, "metrics": {"requests_by_key": True}}))
        reloaded = await gw.client.post("/admin/reload", headers=bearer("sk-admin"))
        assert reloaded.status_code == 200, reloaded.text
        assert (await gw.chat("big")).status_code == 200
        by_key = {**labels, "key": "team"}
        assert await gw.metric("vllm_gateway_requests_total", **by_key) == 1  # from now on
    finally:
        await gw.client.aclose()
