"""`balance: prefix` through the relay: a conversation's turns reach the replica that served
its first, new conversations spread, and /metrics says how each request was routed."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import FakeBackend, running_gateway

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

SYSTEM = "You answer questions about the harbour's tides, berths and ships, briefly. " * 4


def turns(conversation: str, count: int) -> list[dict[str, object]]:
    messages: list[dict[str, str]] = [{"role": "system", "content": f"{conversation}. {SYSTEM}"}]
    bodies: list[dict[str, object]] = []
    for turn in range(count):
        messages = [*messages, {"role": "user", "content": f"Question {turn}?"}]
        bodies.append({"model": "m", "messages": messages, "max_tokens": 4})
        messages = [*messages, {"role": "assistant", "content": f"Answer {turn}."}]
    return bodies


def test_each_conversation_stays_on_one_replica_and_the_routes_are_counted() -> None:
    a, b = FakeBackend("m"), FakeBackend("m")
    try:
        models = [{"name": "m", "urls": [a.url, b.url], "balance": "prefix"}]
        with running_gateway(models) as gateway, httpx.Client(base_url=gateway.url) as client:
            served = []
            for conversation in ("first", "second"):
                for body in turns(conversation, 3):
                    assert client.post("/v1/chat/completions", json=body).status_code == 200
                served.append((a.stats()["completed"], b.stats()["completed"]))
            text = client.get("/metrics").text
    finally:
        a.close()
        b.close()
    assert sorted(served[0]) == [0, 3]  # the first conversation on one replica
    assert served[1] == (3, 3)  # the second, new, on the other
    routes = {
        (s.labels["replica"], s.labels["route"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm_gateway_prefix_routes_total"
    }
    assert routes[("0", "new")] == routes[("1", "new")] == 1
    assert routes[("0", "prefix")] == routes[("1", "prefix")] == 2
    assert routes[("0", "load")] == routes[("1", "load")] == 0
