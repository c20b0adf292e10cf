"""Model queues through a gateway of two workers as users run it (`python -m gateway serve`,
`workers: 2`) over fake vLLM servers: `max_in_flight` and `max_waiting` hold across both
workers (one queue, the control plane's), and an on-demand model with a queue starts once for
requests on both workers, each within its own deadline. The same in-process: test_turns.py."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import workers
from tests.helpers import wait_until
from tests.servers import FAKE_VLLM, FakeBackend, GatewayProcess
from tests.workers import Client, one_on_each, worker_pids

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEY = "sk-ops"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}
LONG = {**CHAT, "stream": True, "fake": {"chunks": 600, "gap_ms": 50}}  # 30 s, cut by the test


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend("q")
    yield fake
    fake.close()


@pytest.fixture
def gateway(backend: FakeBackend, tmp_path: Path) -> Iterator[GatewayProcess]:
    config = {
        "workers": 2,
        "log_dir": str(tmp_path / "logs"),
        "launcher": [sys.executable, FAKE_VLLM],
        "api_keys": [{"name": "ops", "key": KEY, "admin": True}],
        "models": [
            {"name": "q", "url": backend.url, "queue": {"max_in_flight": 2, "max_waiting": 2}},
            {
                "name": "od",
                "vllm": {"model": "fake", "args": {"startup-delay": 2}},
                "on_demand": {"idle_ttl": 300, "min_resident": 0, "start_timeout": 30},
                "queue": {"max_in_flight": 1},
            },
        ],
    }
    gw = GatewayProcess(config, tmp_path)
    yield gw
    gw.close()


def metric(gateway: GatewayProcess, pattern: str) -> float:
    return workers.metric(gateway, pattern, KEY)


def running(backend: FakeBackend) -> int:
    stats = httpx.get(f"{backend.url}/fake/stats").json()
    return int(stats["started"] - stats["completed"] - stats["aborted"])


def test_max_in_flight_and_max_waiting_hold_across_both_workers(
    gateway: GatewayProcess, backend: FakeBackend
) -> None:
    pids = worker_pids(gateway)
    streams = one_on_each(gateway, pids)
    for client in streams.values():
        response = client.open("POST", "/v1/chat/completions", {**LONG, "model": "q"}, KEY)
        assert response.status == 200
    wait_until(lambda: running(backend) == 2, 10, "two streams at the fake")
    waiters = one_on_each(gateway, pids)
    statuses: list[int] = []

    def wait_in_queue(client: Client) -> None:
        statuses.append(client.call("POST", "/v1/chat/completions", {**CHAT, "model": "q"}, KEY)[0])

    threads = [threading.Thread(target=wait_in_queue, args=(c,)) for c in waiters.values()]
    for thread in threads:
        thread.start()
    wait_until(
        lambda: metric(gateway, r'vllm_gateway_queue_length\{model="q"\}') == 2, 10, "two waiting"
    )
    assert running(backend) == 2
    for client in one_on_each(gateway, pids).values():  # a third waiter, on either worker
        status, body = client.call("POST", "/v1/chat/completions", {**CHAT, "model": "q"}, KEY)
        assert (status, b'"queue_full"' in body) == (429, True)
        assert int(client.headers["retry-after"]) >= 1
    for client in streams.values():
        client.close()  # the streams end: the waiters' turns come
    for thread in threads:
        thread.join(30)
    assert statuses == [200, 200]
    assert httpx.get(f"{backend.url}/fake/stats").json()["max_running"] == 2
    assert metric(gateway, r'vllm_gateway_queue_rejections_total\{model="q",reason="queue_full"\}')
    waited = r'vllm_gateway_queue_wait_seconds_count\{model="q"\}'  # summed over the workers
    wait_until(lambda: metric(gateway, waited) == 4, 10, "the four admitted requests' waits")


def test_an_on_demand_model_with_a_queue_starts_once_for_both_workers_within_each_deadline(
    gateway: GatewayProcess,
) -> None:
    clients = one_on_each(gateway, worker_pids(gateway))
    first = next(iter(clients.values()))
    first.conn.request(
        "POST",
        "/v1/chat/completions",
        body=httpx.Request("POST", "/", json={**CHAT, "model": "od"}).read(),
        headers={
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
            "x-vllm-gateway-max-wait": "0.5",  # its start takes 2 s
        },
    )
    late = first.conn.getresponse()
    assert (late.status, b'"max_wait_exceeded"' in late.read()) == (503, True)
    statuses: list[int] = []

    def ask(client: Client) -> None:
        body: dict[str, Any] = {**CHAT, "model": "od"}
        statuses.append(client.call("POST", "/v1/chat/completions", body, KEY)[0])

    both = [*clients.values(), *one_on_each(gateway, worker_pids(gateway)).values()]
    threads = [threading.Thread(target=ask, args=(c,)) for c in both]  # two on each worker
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 4
    assert metric(gateway, r'vllm_gateway_model_loads_total\{model="od"\}') == 1
