"""Two gateways (real uvicorn servers, in front of the fake vLLM) sharing one real Redis: a key's
requests per minute and its requests in flight are counted once for both, and with Redis
stopped each answers as its `on_error` says."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from tests.helpers import bearer, wait_until
from tests.redis_server import RedisServer
from tests.servers import FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes and servers on loopback

KEYS = [
    {"name": "limited", "key": "sk-limited", "requests_per_minute": 4},
    {"name": "two-at-once", "key": "sk-four", "max_concurrent": 2},
    {"name": "free", "key": "sk-free"},
    {"name": "ops", "key": "sk-ops", "monitor": True},
]


def chat(fake: FakeBackend, **options: object) -> dict[str, Any]:
    return {"model": fake.name, "messages": [{"role": "user", "content": "hi"}], "fake": options}


def two_gateways(fake: FakeBackend, redis: RedisServer, **store: object) -> list[GatewayServer]:
    limits_store = {"url": redis.url, "prefix": f"test-{uuid.uuid4().hex[:8]}", **store}
    settings = gateway_settings(
        [{"name": fake.name, "url": fake.url}], api_keys=KEYS, limits_store=limits_store
    )
    return [GatewayServer(settings), GatewayServer(settings)]


@pytest.fixture
def gateways(fake: FakeBackend, redis_server: RedisServer) -> Iterator[list[GatewayServer]]:
    both = two_gateways(fake, redis_server)
    yield both
    for gateway in both:
        gateway.close()


def post(gateway: GatewayServer, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=bearer(key))


def test_a_keys_requests_per_minute_are_counted_once_for_both_gateways(
    gateways: list[GatewayServer], fake: FakeBackend
) -> None:
    first, second = gateways
    answers = [post(g, "sk-limited", chat(fake)).status_code for g in (first, second) * 2]
    assert answers == [200] * 4
    for gateway in gateways:
        refused = post(gateway, "sk-limited", chat(fake))
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 15  # one token every 15 s
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert post(first, "sk-free", chat(fake)).status_code == 200


def test_max_concurrent_holds_across_both_gateways(
    gateways: list[GatewayServer], fake: FakeBackend
) -> None:
    first, second = gateways
    long_stream = {**chat(fake, chunks=2000, gap_ms=20), "stream": True}
    with httpx.Client(timeout=30) as client, ExitStack() as streams:
        for gateway in gateways:
            url = f"{gateway.url}/v1/chat/completions"
            opened = client.stream("POST", url, json=long_stream, headers=bearer("sk-four"))
            assert streams.enter_context(opened).status_code == 200
        for gateway in gateways:
            refused = post(gateway, "sk-four", chat(fake))
            assert refused.status_code == 429 and "2 requests in flight" in refused.text
    # Both clients left: their slots come back once each gateway has seen them go.
    wait_until(
        lambda: post(second, "sk-four", chat(fake)).status_code == 200, 10, "a slot to free up"
    )
    assert post(first, "sk-four", chat(fake)).status_code == 200


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


def metric(gateway: GatewayServer, name: str) -> str:
    text = httpx.get(f"{gateway.url}/metrics", headers=bearer("sk-ops")).text
    return next(line for line in text.splitlines() if line.startswith(name))


def test_redis_stopped_mid_run_fail_closed_answers_503_fail_open_lets_through(
    fake: FakeBackend, own_redis: RedisServer
) -> None:
    closed = two_gateways(fake, own_redis, on_error="fail_closed")
    opened = two_gateways(fake, own_redis)
    try:
        assert post(closed[0], "sk-limited", chat(fake)).status_code == 200
        own_redis.stop()
        refused = post(closed[0], "sk-limited", chat(fake))
        assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
        assert refused.json()["error"] == {
            "message": "Key 'limited' has limits, and the store they are counted in cannot be "
            "reached; retry shortly.",
            "type": "service_unavailable",
            "param": None,
            "code": "limits_unavailable",
        }
        assert post(closed[1], "sk-free", chat(fake)).status_code == 200  # no limits to count
        # fail_open: past the limit of 4 a minute, since nothing counts them meanwhile.
        assert [post(opened[0], "sk-limited", chat(fake)).status_code for _ in range(6)] == [
            200
        ] * 6
        assert metric(opened[0], "vllm_gateway_limits_store_up") == (
            "vllm_gateway_limits_store_up 0.0"
        )
        assert metric(opened[0], "vllm_gateway_limits_store_policy_total") == (
            'vllm_gateway_limits_store_policy_total{policy="fail_open"} 6.0'
        )
        own_redis.start()
        wait_until(
            lambda: metric(closed[0], "vllm_gateway_limits_store_up").endswith(" 1.0"),
            10,
            "the gateway to find Redis again",
        )
        assert post(closed[0], "sk-limited", chat(fake)).status_code == 200
    finally:
        for gateway in closed + opened:
            gateway.close()
