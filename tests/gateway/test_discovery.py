"""Pods found in DNS behind one model, through the whole gateway: fake vLLM servers on
127.0.0.1, .2 and .3 with the same port stand for a headless Service's pods; the test's
resolver is its DNS. Real vLLM pods: tests/integration/test_discovery.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from backends.process import free_port
from tests.helpers import Dns, bearer, wait_until
from tests.servers import FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

FAST_HEALTH = {"interval": 0.1, "unhealthy_threshold": 1, "healthy_threshold": 1}
KEYS = [{"name": "ops", "key": "sk-ops", "admin": True}]
OPS = bearer("sk-ops")


class Pods:
    """A gateway whose model `m` discovers its replicas at `pods.test:<port>`."""

    def __init__(self, dns: Dns, port: int) -> None:
        self.dns, self.port = dns, port
        discover = {"dns": f"pods.test:{port}", "interval": 0.1}
        model = {"name": "m", "discover": discover, "health": FAST_HEALTH}
        self.gateway = GatewayServer(gateway_settings([model], api_keys=KEYS), resolver=dns)
        self.url = self.gateway.url

    def states(self) -> dict[str, str]:
        doc = httpx.get(f"{self.url}/status.json", headers=OPS).json()
        return {r["replica"]: r["state"] for r in doc["models"][0]["replicas"]}

    def address(self, ip: str) -> str:
        return f"{ip}:{self.port}"

    def chat(self, model: str = "m", **fake: object) -> httpx.Response:
        body = {"model": model, "messages": [], "fake": fake}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=OPS, timeout=30)

    def chats(self, n: int, model: str = "m") -> list[int]:
        """Statuses of ``n`` requests sent six at a time, so least-outstanding spreads them."""
        with ThreadPoolExecutor(6) as pool:
            answers = pool.map(lambda _: self.chat(model, chunks=4, gap_ms=50), range(n))
            return [r.status_code for r in answers]


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def pods(port: int) -> Iterator[Pods]:
    gateway = Pods(Dns("127.0.0.1", "127.0.0.2"), port)
    yield gateway
    gateway.gateway.close()


def stream(pods: Pods, results: list[str]) -> None:
    body = {"model": "m", "messages": [], "stream": True, "fake": {"chunks": 30, "gap_ms": 50}}
    with httpx.stream(
        "POST", f"{pods.url}/v1/chat/completions", json=body, headers=OPS, timeout=30
    ) as response:
        results.append(f"{response.status_code} {response.read().decode()}")


def test_pods_are_balanced_and_a_pod_leaving_dns_finishes_its_streams(
    pods: Pods, port: int
) -> None:
    a = FakeBackend("m", port=port, host="127.0.0.1")
    b = FakeBackend("m", port=port, host="127.0.0.2")
    try:
        both = {pods.address("127.0.0.1"): "ready", pods.address("127.0.0.2"): "ready"}
        wait_until(lambda: pods.states() == both, 10, "both pods admitted")
        assert pods.chats(12) == [200] * 12
        assert a.stats()["completed"] >= 4 and b.stats()["completed"] >= 4  # balanced
        results: list[str] = []
        streams = [threading.Thread(target=stream, args=(pods, results)) for _ in range(6)]
        for thread in streams:
            thread.start()
        wait_until(lambda: b.stats()["started"] - b.stats()["completed"] > 0, 10, "b streaming")
        pods.dns.answer = ["127.0.0.1"]  # b's pod goes away (scale-down, rollout)
        wait_until(lambda: pods.states().get(pods.address("127.0.0.2")) == "leaving", 5, "b out")
        b_started = b.stats()["started"]
        assert [pods.chat().status_code for _ in range(5)] == [200] * 5
        assert b.stats()["started"] == b_started  # nothing new for a leaving pod
        for thread in streams:
            thread.join(30)
        assert len(results) == 6
        assert all(r.startswith("200 ") and r.endswith("data: [DONE]\n\n") for r in results)
        assert b.stats()["aborted"] == 0  # its streams finished, none was cut
        wait_until(lambda: pods.address("127.0.0.2") not in pods.states(), 5, "b removed")
    finally:
        a.close()
        b.close()


def test_a_pod_is_admitted_only_once_it_serves_and_an_outage_keeps_the_set(
    pods: Pods, port: int
) -> None:
    a = FakeBackend("m", port=port, host="127.0.0.1")
    slow = FakeBackend("m", "--startup-delay", "1.5", port=port, host="127.0.0.3", wait=False)
    try:
        pods.dns.answer = ["127.0.0.1", "127.0.0.3"]
        states = pods.states
        wait_until(
            lambda: (
                states().get(pods.address("127.0.0.1")) == "ready"
                and pods.address("127.0.0.3") in states()
            ),
            10,
            "a serving and the slow one seen",
        )
        assert pods.states()[pods.address("127.0.0.3")] == "joining"
        assert [pods.chat().status_code for _ in range(5)] == [200] * 5  # all on a meanwhile
        wait_until(lambda: pods.states()[pods.address("127.0.0.3")] == "ready", 10, "slow in")
        pods.dns.answer = OSError("Temporary failure in name resolution")  # DNS down
        asked = len(pods.dns.asked)
        wait_until(lambda: len(pods.dns.asked) > asked + 3, 5, "a few failed lookups")
        assert set(pods.states().values()) == {"ready"} and len(pods.states()) == 2
        assert pods.chats(12) == [200] * 12
        assert slow.stats()["completed"] > 0
        labelled = f'replica="{pods.address("127.0.0.3")}",state="ready"'
        assert labelled in httpx.get(f"{pods.url}/metrics", headers=OPS).text
        relayed = httpx.get(
            f"{pods.url}/backends/m/metrics",
            params={"replica": pods.address("127.0.0.3")},
            headers=OPS,
        )
        assert relayed.status_code == 200
        assert relayed.headers["content-type"].startswith("text/plain; version=0.0.4")  # as sent
    finally:
        a.close()
        slow.close()


def test_a_joining_pod_gets_the_runtime_adapters_before_it_is_admitted(
    pods: Pods, port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    pods.dns.answer = ["127.0.0.1"]
    a = FakeBackend("m", port=port, host="127.0.0.1")
    b = FakeBackend("m", port=port, host="127.0.0.2")
    try:
        wait_until(lambda: pods.states() == {pods.address("127.0.0.1"): "ready"}, 10, "a")
        loaded = httpx.post(
            f"{pods.url}/admin/models/m/adapters",
            json={"name": "tone", "path": "/adapters/tone"},
            headers=OPS,
        )
        assert loaded.status_code == 200
        pods.dns.answer = ["127.0.0.1", "127.0.0.2"]
        wait_until(lambda: pods.states().get(pods.address("127.0.0.2")) == "ready", 10, "b")
        cards = httpx.get(f"{b.url}/v1/models").json()["data"]
        assert "tone" in {c["id"] for c in cards}
        assert pods.chats(12, "tone") == [200] * 12
        assert b.stats()["completed"] > 0
    finally:
        a.close()
        b.close()
