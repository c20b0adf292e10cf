"""Per-key limits through a gateway of two workers as users run it (`python -m gateway serve`,
`workers: 2`, no Redis) over the fake vLLM: a key's requests per minute and its requests in
flight are counted once for both workers (the host's table), a killed worker's slots come back,
a key a reload adds is limited on both; with `limits_store` naming a real Redis the workers
count there. The same in-process: test_key_limits.py."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import wait_until
from tests.redis_server import RedisServer
from tests.servers import FAKE_VLLM, FakeBackend, GatewayProcess
from tests.workers import Client, one_on_each, worker_pids

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

ADMIN, RATE, FOUR = "sk-ops", "sk-rate", "sk-four"
RPM = 6  # a token every 10 s: a test's dozen requests take far less
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
LONG = {**CHAT, "stream": True, "fake": {"chunks": 600, "gap_ms": 50}}  # 30 s, cut by the test


def config(backend: FakeBackend, tmp: Path, **extra: Any) -> dict[str, Any]:
    return {
        "workers": 2,
        "log_dir": str(tmp / "logs"),
        "launcher": [sys.executable, FAKE_VLLM],
        "api_keys": [
            {"name": "ops", "key": ADMIN, "admin": True},
            {"name": "rate", "key": RATE, "requests_per_minute": RPM},
            {"name": "four", "key": FOUR, "max_concurrent": 4},
        ],
        "models": [{"name": "m", "url": backend.url}],
        **extra,
    }


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend("m")
    yield fake
    fake.close()


@pytest.fixture
def gateway(backend: FakeBackend, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(config(backend, tmp_path), tmp_path)
    yield gw
    gw.close()


def running(backend: FakeBackend) -> int:
    stats = httpx.get(f"{backend.url}/fake/stats").json()
    return int(stats["started"] - stats["completed"] - stats["aborted"])


def alternating(clients: dict[int, Client], key: str, count: int) -> list[int]:
    """``count`` requests, one worker then the other; each refusal must say when to retry."""
    statuses = []
    both = list(clients.values())
    for i in range(count):
        client = both[i % 2]
        status, _ = client.call("POST", "/v1/chat/completions", CHAT, key)
        statuses.append(status)
        if status == 429:
            assert 1 <= int(client.headers["retry-after"]) <= 60 // RPM
    return statuses


def test_a_key_gets_exactly_its_requests_per_minute_through_both_workers(
    gateway: GatewayProcess,
) -> None:
    clients = one_on_each(gateway, worker_pids(gateway))
    assert alternating(clients, RATE, 2 * RPM) == [200] * RPM + [429] * RPM


def test_max_concurrent_holds_across_both_workers_and_a_killed_workers_slots_come_back(
    gateway: GatewayProcess, backend: FakeBackend
) -> None:
    pids = worker_pids(gateway)
    streams = [one_on_each(gateway, pids) for _ in range(2)]  # two streams on each worker
    for pair in streams:
        for client in pair.values():
            assert client.open("POST", "/v1/chat/completions", LONG, FOUR).status == 200
    wait_until(lambda: running(backend) == 4, 10, "four streams at the fake")
    for client in one_on_each(gateway, pids).values():  # a fifth, on either worker
        assert client.call("POST", "/v1/chat/completions", CHAT, FOUR)[0] == 429
        assert client.headers["retry-after"]
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)  # its two streams end with it, and so do their slots
    wait_until(lambda: running(backend) == 2, 10, "the killed worker's streams cut")
    wait_until(
        lambda: len(worker_pids(gateway)) == 2 and victim not in worker_pids(gateway),
        30,
        "a new worker",
    )
    fresh = one_on_each(gateway, worker_pids(gateway))
    for client in fresh.values():
        assert client.open("POST", "/v1/chat/completions", LONG, FOUR).status == 200
    wait_until(lambda: running(backend) == 4, 10, "four streams again")
    for client in one_on_each(gateway, worker_pids(gateway)).values():
        assert client.call("POST", "/v1/chat/completions", CHAT, FOUR)[0] == 429
    assert survivor in worker_pids(gateway)
    assert httpx.get(f"{backend.url}/fake/stats").json()["max_running"] == 4
    for client in [*fresh.values(), *streams[0].values(), *streams[1].values()]:
        client.close()


def test_a_key_added_by_a_reload_gets_its_limits_on_both_workers(
    gateway: GatewayProcess, backend: FakeBackend, tmp_path: Path
) -> None:
    new = config(backend, tmp_path, keep_backends=0)
    new["api_keys"].append({"name": "late", "key": "sk-late", "requests_per_minute": RPM})
    new["models"][0]["aliases"] = ["m-alias"]  # a worker routes it once it has the new keys
    gateway.path.write_text(yaml.safe_dump(new))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert httpx.post(f"{gateway.url}/admin/reload", headers=admin).status_code == 200
    clients = one_on_each(gateway, worker_pids(gateway))
    alias = {**CHAT, "model": "m-alias"}
    for client in clients.values():  # asked with the unlimited admin key: no token spent
        wait_until(
            lambda c=client: c.call("POST", "/v1/chat/completions", alias, ADMIN)[0] == 200,
            10,
            "the reload on this worker",
        )
    assert alternating(clients, "sk-late", 2 * RPM) == [200] * RPM + [429] * RPM


def test_with_redis_the_workers_count_there(
    backend: FakeBackend, tmp_path: Path, redis_server: RedisServer
) -> None:
    store = {"url": redis_server.url, "prefix": f"test-{uuid.uuid4().hex[:8]}"}
    gw = GatewayProcess(config(backend, tmp_path, limits_store=store), tmp_path)
    try:
        clients = one_on_each(gw, worker_pids(gw))
        assert alternating(clients, RATE, 2 * RPM) == [200] * RPM + [429] * RPM
    finally:
        gw.close()
