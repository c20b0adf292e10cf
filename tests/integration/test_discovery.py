"""Two real tiny-chat servers as two pods of one model, found in DNS, under steady load.

The rig's tiny-chat server (127.0.0.1) and its second "pod" (127.0.0.2, same port) stand for
a headless Service's pods; the test's resolver is its DNS. Under load through the gateway: the
second pod leaves the answer (drained, then gone) and comes back (admitted once it serves);
then, with both present, its server is killed with SIGKILL and started again. No request may
fail that had not started streaming; a stream the kill cuts ends with an error event and
[DONE].
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import Dns, bearer, wait_until
from tests.integration.outcomes import ACCEPTED, chat_outcome
from tests.integration.spawned import api_servers
from tests.servers import GatewayServer, gateway_settings
from tests.vllm_rig import ARTIFACTS, POD_HOST, VllmRig

pytestmark = pytest.mark.vllm
KEY = "sk-pods"  # an admin key: it also reads /status.json
CLIENTS = 4


class Load:
    """Clients sending chats (every other one streamed) until stopped; outcomes counted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(n,)) for n in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def _client(self, n: int) -> None:
        while not self._stop.is_set():
            outcome = one_request(self.url, stream=n % 2 == 0)
            with self._lock:
                self.outcomes[outcome] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.outcomes.values())

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return self.outcomes


def one_request(url: str, stream: bool) -> str:
    return chat_outcome(url, "tiny-chat", bearer(KEY), stream, 48 if stream else 8)


def served(pod_url: str) -> float:
    """Requests the pod's own vLLM has finished (vllm:request_success_total)."""
    try:
        text = httpx.get(f"{pod_url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return -1.0
    lines = [ln for ln in text.splitlines() if ln.startswith("vllm:request_success_total")]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


@pytest.fixture
def pods(rig: VllmRig) -> Iterator[tuple[GatewayServer, Dns, str]]:
    port = int(rig.urls["tiny-chat"].rsplit(":", 1)[1])
    dns = Dns("127.0.0.1", POD_HOST)
    model = {
        "name": "tiny-chat",
        "discover": {"dns": f"tiny-chat-pods.test:{port}", "interval": 0.5},
        "health": {"interval": 0.5, "unhealthy_threshold": 1, "healthy_threshold": 1},
    }
    keys = [{"name": "ops", "key": KEY, "admin": True}]
    gateway = GatewayServer(gateway_settings([model], api_keys=keys), resolver=dns)
    try:
        yield gateway, dns, f"{POD_HOST}:{port}"
    finally:
        gateway.close()
        rig.start_vision()  # in the pod's place, ahead of test_media.py


def states(url: str) -> dict[str, str]:
    doc = httpx.get(f"{url}/status.json", headers=bearer(KEY), timeout=10).json()
    return {r["replica"]: r["state"] for r in doc["models"][0]["replicas"]}


def test_pods_leave_join_and_die_under_load_without_failing_a_request(
    rig: VllmRig, pods: tuple[GatewayServer, Dns, str]
) -> None:
    gateway, dns, pod = pods
    first = pod.replace(POD_HOST, "127.0.0.1")
    wait_until(lambda: states(gateway.url) == {first: "ready", pod: "ready"}, 60, "both pods")
    load = Load(gateway.url)
    timings: dict[str, float] = {}
    try:
        wait_until(lambda: served(rig.pod_url) > 0, 60, "the pod to serve its share")
        began = time.monotonic()
        dns.answer = ["127.0.0.1"]  # the pod leaves (scale-down, rollout)
        wait_until(lambda: pod not in states(gateway.url), 60, "the pod drained and removed")
        timings["left_after_s"] = time.monotonic() - began
        gone_at, total = served(rig.pod_url), load.total()
        wait_until(lambda: load.total() >= total + 8, 60, "eight more requests")
        assert served(rig.pod_url) == gone_at  # none reached the pod once it had left
        began = time.monotonic()
        dns.answer = ["127.0.0.1", POD_HOST]  # and comes back
        wait_until(lambda: states(gateway.url).get(pod) == "ready", 60, "the pod admitted")
        timings["joined_after_s"] = time.monotonic() - began
        wait_until(lambda: served(rig.pod_url) > gone_at, 60, "the pod serving again")
        assert rig.pod is not None
        (server,) = api_servers(rig.pod.pid)
        os.kill(server, signal.SIGKILL)  # a crash, with both addresses still in DNS
        killed = time.monotonic()
        rig.pod.wait(60)  # its reaper ends the rest of its tree, then exits
        wait_until(lambda: states(gateway.url).get(pod) != "ready", 30, "the pod taken out")
        total = load.total()
        wait_until(lambda: load.total() >= total + 20, 60, "twenty requests with the pod down")
    finally:
        outcomes = load.stop()
    assert set(outcomes) <= ACCEPTED, outcomes
    assert outcomes["plain 200"] > 0 and outcomes["stream complete"] > 0
    # Started again without the load, which on two cores would slow its start several-fold.
    rig.start_pod()
    wait_until(lambda: states(gateway.url).get(pod) == "ready", 300, "the restarted pod")
    timings["readmitted_after_kill_s"] = time.monotonic() - killed
    back_at = served(rig.pod_url)
    with ThreadPoolExecutor(4) as pool:
        after = Counter(pool.map(lambda n: one_request(gateway.url, n % 2 == 0), range(16)))
    assert after == {"plain 200": 8, "stream complete": 8}, after
    assert served(rig.pod_url) > back_at  # the restarted pod takes its share again
    report = {"outcomes": dict(outcomes), **{k: round(v, 1) for k, v in timings.items()}}
    (ARTIFACTS / "discovery-under-load.json").write_text(json.dumps(report, indent=2))
    print(report)
