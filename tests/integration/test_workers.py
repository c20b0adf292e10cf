"""A gateway of two workers (`workers: 2`) over real vLLM CPU servers: it spawns its models,
starts an on-demand one for requests waiting on both workers (once, in the one queue the
control plane keeps for it), keeps serving on one worker while the other is killed (and
restarted, no server touched), shows the whole gateway's counts in /metrics, and counts a
key's requests per minute once for both workers.

Two tiny chat servers at most: `spawned` (always on) and `later` (on demand). The same paths
with the fake vLLM, and the faults it can provoke, are in tests/gateway/workers/.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration.spawned import AUTH, tiny_chat, vllm_servers
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS
from tests.workers import Client, one_on_each, worker_pids

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

READY = 290.0  # a cold start of a tiny server on a busy 2-core machine
KEY = AUTH["Authorization"].removeprefix("Bearer ")
RATE, RPM = "sk-workers-rate", 4  # a token every 15 s: the test's requests take far less


def chat_body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture(scope="module")
def gw(request: pytest.FixtureRequest) -> Iterator[GatewayProcess]:
    with contextlib.suppress(pytest.FixtureLookupError):
        request.getfixturevalue("rig_stopped")  # in the whole suite: once the rig is gone
    later = {
        **tiny_chat("later", 1, 512),
        "on_demand": {"idle_ttl": 600, "start_timeout": READY, "min_resident": 0},
        "queue": {"max_in_flight": 1},  # its requests take turns across both workers
    }
    config = {
        "workers": 2,
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "workers"),
        "api_keys": [
            {"name": "ops", "key": KEY, "admin": True},
            {"name": "rate", "key": RATE, "requests_per_minute": RPM},
        ],
        "models": [tiny_chat("spawned", 0, 512), later],
    }
    gateway = GatewayProcess(config, ARTIFACTS)
    yield gateway
    gateway.close()


def chat(client: Client, model: str) -> int:
    return client.call("POST", "/v1/chat/completions", chat_body(model), KEY)[0]


def served(gw: GatewayProcess, model: str) -> float:
    """Chat completions answered 200, summed over the workers (by key only when asked for)."""
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=30).text
    wanted = ('endpoint="/v1/chat/completions"', f'model="{model}"', 'status="200"')
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm_gateway_requests_total{") and all(w in line for w in wanted)
    )


def test_the_spawned_model_answers_on_both_workers(gw: GatewayProcess) -> None:
    def answers() -> bool:
        try:
            body = chat_body("spawned")
            return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH).is_success
        except httpx.HTTPError:
            return False

    wait_until(answers, READY, "the spawned model", every=1)
    pids = worker_pids(gw)
    assert len(pids) == 2
    clients = one_on_each(gw, pids)
    assert [chat(c, "spawned") for c in clients.values()] == [200, 200]


def test_an_on_demand_model_starts_once_for_requests_waiting_on_both_workers(
    gw: GatewayProcess,
) -> None:
    clients = one_on_each(gw, worker_pids(gw))
    statuses: list[int] = []
    threads = [
        threading.Thread(target=lambda c=c: statuses.append(chat(c, "later")))
        for c in clients.values()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(READY + 30)
    assert statuses == [200, 200]
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH).text
    assert 'vllm_gateway_model_loads_total{model="later"} 1.0' in text
    assert 'vllm_gateway_queue_wait_seconds_count{model="later"} 2.0' in text  # both, summed
    assert len(vllm_servers(gw)) == 2  # spawned, and one server of later


def test_a_killed_worker_is_restarted_while_the_other_serves_and_no_server_is_touched(
    gw: GatewayProcess,
) -> None:
    servers = set(vllm_servers(gw))
    clients = one_on_each(gw, worker_pids(gw))
    (victim, _), (survivor, client) = clients.items()
    statuses: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            statuses.append(chat(client, "spawned"))

    runner = threading.Thread(target=loop)
    runner.start()
    try:
        wait_until(lambda: len(statuses) >= 3, 60, "requests on the surviving worker")
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(worker_pids(gw)) == 2 and victim not in worker_pids(gw), 60, "a new worker"
        )
        count = len(statuses)
        wait_until(lambda: len(statuses) >= count + 3, 60, "requests after the restart")
    finally:
        stop.set()
        runner.join(60)
    assert set(statuses) == {200}
    assert survivor in worker_pids(gw)
    assert set(vllm_servers(gw)) == servers  # the same pids: no server restarted
    new = one_on_each(gw, worker_pids(gw))
    assert {chat(c, "later") for c in new.values()} == {200}


def test_metrics_count_the_requests_of_every_worker(gw: GatewayProcess) -> None:
    before = served(gw, "spawned")
    clients = one_on_each(gw, worker_pids(gw))
    for client in clients.values():
        assert [chat(client, "spawned") for _ in range(3)] == [200] * 3
    assert served(gw, "spawned") == before + 6
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH).text
    assert 'vllm_gateway_requests_in_flight{model="spawned"} 0.0' in text


def test_a_keys_requests_per_minute_are_counted_once_for_both_workers(gw: GatewayProcess) -> None:
    clients = list(one_on_each(gw, worker_pids(gw)).values())
    statuses = []
    for i in range(2 * RPM):
        client = clients[i % 2]
        statuses.append(client.call("POST", "/v1/chat/completions", chat_body("spawned"), RATE)[0])
        if statuses[-1] == 429:
            assert 1 <= int(client.headers["retry-after"]) <= 60 // RPM
    assert statuses == [200] * RPM + [429] * RPM
