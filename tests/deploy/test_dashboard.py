"""The Grafana dashboard only queries metrics the gateway really exports."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ROOT, FakeBackend, running_gateway

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

DASHBOARD = ROOT / "deploy" / "observability" / "grafana-dashboard.json"


def queried_metrics() -> set[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bvllm_gateway_[a-z_]+", expr)}


def test_every_metric_the_dashboard_queries_is_exported(fake: FakeBackend) -> None:
    with running_gateway([{"name": fake.name, "url": fake.url}]) as gateway:
        usage = {"stream_options": {"include_usage": True}}  # so that tokens are counted
        request = {"model": fake.name, "messages": [], "stream": True, **usage}
        httpx.post(f"{gateway.url}/v1/chat/completions", json=request)
        text = httpx.get(f"{gateway.url}/metrics").text
    exported = {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }
    queried = queried_metrics()
    assert len(queried) >= 8
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
