"""Several replicas behind one model name: failover, ejection, re-admission, balancing.

Real-vLLM replicas under load are in tests/integration/test_replicas.py; the fakes here can be
killed and brought back on the same port in milliseconds.
"""

from __future__ import annotations

import threading
from collections import Counter

import httpx
import pytest

from tests.helpers import wait_until
from tests.servers import FakeBackend, running_gateway

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

FAST_HEALTH = {"interval": 0.2, "unhealthy_threshold": 1, "healthy_threshold": 2}


def chat(url: str, **fake: object) -> httpx.Response:
    body = {"model": "m", "messages": [], "fake": fake}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)


def replica_states(url: str) -> list[str]:
    doc = httpx.get(f"{url}/status.json").json()
    return [r["state"] for r in doc["models"][0]["replicas"]]


def test_a_dead_replica_costs_no_request_and_comes_back_when_healthy() -> None:
    a, b = FakeBackend("m"), FakeBackend("m")
    models = [{"name": "m", "urls": [a.url, b.url], "health": FAST_HEALTH}]
    try:
        with running_gateway(models) as gateway:
            a.kill()
            statuses = Counter(chat(gateway.url).status_code for _ in range(40))
            assert statuses == {200: 40}  # refused connections were retried on b
            wait_until(lambda: replica_states(gateway.url)[0] == "unhealthy", 3, "a out")
            assert b.stats()["completed"] == 40
            a = FakeBackend("m", port=a.port)  # the same server, restarted
            wait_until(lambda: replica_states(gateway.url) == ["ready", "ready"], 5, "a back")
            for _ in range(20):
                chat(gateway.url)
            assert a.stats()["completed"] > 0  # re-admitted, serving again
    finally:
        a.close()
        b.close()


def test_no_healthy_replica_is_503_with_retry_after() -> None:
    a = FakeBackend("m")
    models = [{"name": "m", "urls": [a.url], "health": FAST_HEALTH}]
    with running_gateway(models) as gateway:
        a.kill()
        wait_until(lambda: replica_states(gateway.url) == ["unhealthy"], 3, "a out")
        response = chat(gateway.url)
        assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
        assert response.json()["error"]["code"] == "backend_unavailable"


def test_5xx_answers_eject_a_replica_for_its_cool_down() -> None:
    a, b = FakeBackend("m"), FakeBackend("m")
    health = {**FAST_HEALTH, "interval": 60, "eject_after": 2, "eject_seconds": 60}
    models = [{"name": "m", "urls": [a.url, b.url], "health": health}]
    try:
        with running_gateway(models) as gateway:
            codes = [chat(gateway.url, status=500).status_code for _ in range(4)]
            assert codes == [500] * 4  # a backend's own 5xx is relayed, never retried
            doc = httpx.get(f"{gateway.url}/status.json").json()
            assert [r["ejected"] for r in doc["models"][0]["replicas"]] == [True, True]
    finally:
        a.close()
        b.close()


def seen_load(url: str) -> float | None:
    load = httpx.get(f"{url}/status.json").json()["models"][0]["replicas"][0]["vllm_load"]
    return None if load is None else load["running"]


def test_vllm_metrics_policy_steers_around_a_busy_replica() -> None:
    """Replica a is busy with long generations sent to it directly (not via the gateway)."""
    a, b = FakeBackend("m"), FakeBackend("m")
    models = [{"name": "m", "urls": [a.url, b.url], "balance": "vllm_metrics"}]
    try:
        with running_gateway(models) as gateway:
            long = {"model": "m", "messages": [], "fake": {"chunks": 40, "gap_ms": 100}}
            busy = [
                threading.Thread(
                    target=httpx.post,
                    args=(f"{a.url}/v1/chat/completions",),
                    kwargs={"json": long, "timeout": 30},
                )
                for _ in range(4)
            ]
            for thread in busy:
                thread.start()
            wait_until(lambda: a.stats()["started"] == 4, 3, "a busy")
            wait_until(lambda: seen_load(gateway.url) == 4, 3, "the gateway to scrape a's load")
            before_a = a.stats()["started"]
            for _ in range(20):
                assert chat(gateway.url).status_code == 200
            to_a = a.stats()["started"] - before_a
            for thread in busy:
                thread.join()
    finally:
        a.close()
        b.close()
    assert to_a <= 2, f"{to_a} of 20 new requests went to the busy replica"
