"""A gateway of two workers as users run it (`python -m gateway serve`), over fake vLLM
servers: the port shared, every path answered on either worker, an on-demand start asked from
both, a worker killed under load (the other keeps serving, no backend is touched), the
counts summed. The same with real vLLM servers: tests/integration/test_workers.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import workers
from tests.helpers import wait_until
from tests.servers import FAKE_VLLM, FakeBackend, GatewayProcess, alive, descendants
from tests.workers import Client, one_on_each, worker_pids

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEY = "sk-workers"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def config(backend: FakeBackend, **extra: Any) -> dict[str, Any]:
    return {
        "workers": 2,
        "api_keys": [{"name": "ops", "key": KEY, "admin": True}],
        "launcher": [sys.executable, FAKE_VLLM],
        "models": [
            {"name": "m", "url": backend.url},
            {
                "name": "od",
                "vllm": {"model": "fake"},
                "on_demand": {"idle_ttl": 300, "min_resident": 0, "start_timeout": 30},
            },
        ],
        **extra,
    }


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    fake = FakeBackend("m")
    yield fake
    fake.close()


@pytest.fixture
def gateway(backend: FakeBackend, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(config(backend, log_dir=str(tmp_path / "logs")), tmp_path)
    yield gw
    gw.close()


def metric(gateway: GatewayProcess, pattern: str) -> float:
    return workers.metric(gateway, pattern, KEY)


def served(gateway: GatewayProcess) -> float:
    return metric(
        gateway,
        r'vllm_gateway_requests_total\{endpoint="/v1/chat/completions",'
        r'model="m",status="200"\}',  # no key label: metrics.requests_by_key is off
    )


def test_both_workers_relay_and_pass_every_other_path_to_the_control_plane(
    gateway: GatewayProcess,
) -> None:
    pids = worker_pids(gateway)
    assert len(pids) == 2
    clients = one_on_each(gateway, pids)
    for client in clients.values():
        assert client.call("POST", "/v1/chat/completions", CHAT, KEY)[0] == 200
        status, body = client.call("GET", "/v1/models", key=KEY)
        assert status == 200 and b'"od"' in body
        assert client.call("GET", "/v1/models")[0] == 401  # the control plane's access check
        assert client.call("GET", "/health")[0] == 200
    assert served(gateway) == 2  # one per worker, summed
    status = httpx.get(f"{gateway.url}/status.json", headers={"Authorization": f"Bearer {KEY}"})
    assert status.json()["models"][0]["recent"]["requests"] == 2


def test_an_on_demand_model_starts_once_for_requests_waiting_on_both_workers(
    gateway: GatewayProcess,
) -> None:
    clients = one_on_each(gateway, worker_pids(gateway))
    results: list[int] = []

    def ask(client: Client) -> None:
        results.append(client.call("POST", "/v1/chat/completions", {**CHAT, "model": "od"}, KEY)[0])

    threads = [threading.Thread(target=ask, args=(c,)) for c in clients.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [200, 200]
    assert metric(gateway, r'vllm_gateway_model_loads_total\{model="od"\}') == 1


def test_requests_through_both_workers_feed_the_on_demand_models_rates_in_the_control_plane(
    gateway: GatewayProcess,
) -> None:
    """The first request waited for the start (counted by the control plane's own ``ready``);
    the others found the model serving and were counted by their workers, told in batches:
    /admin/models shows their last arrival and a service rate, as one process would."""
    clients = one_on_each(gateway, worker_pids(gateway))
    body = {**CHAT, "model": "od"}
    first, *_ = clients.values()
    assert first.call("POST", "/v1/chat/completions", body, KEY)[0] == 200  # its start
    started = od(gateway)
    asked_at = started["last_request"]
    for client in clients.values():
        for _ in range(5):
            assert client.call("POST", "/v1/chat/completions", body, KEY)[0] == 200
    wait_until(
        lambda: (
            od(gateway)["last_request"] > asked_at
            and od(gateway)["costs"]["requests_per_s"] is not None
        ),
        10,
        "the workers' requests in the control plane's books",
    )
    costs = od(gateway)["costs"]
    assert costs["tokens_per_s"] is not None and costs["request_s"] is not None
    assert od(gateway)["loads"] == started["loads"] == 1


def test_a_request_that_falls_back_on_either_worker_starts_the_cold_model_for_later_ones(
    backend: FakeBackend, tmp_path: Path
) -> None:
    """`od` is not started and falls back to `m`: a request on each worker is answered by `m`
    at once, and the control plane starts `od` (once) for the requests after them."""
    settings = config(backend, log_dir=str(tmp_path / "logs"))
    settings["models"][1]["fallbacks"] = ["m"]
    gateway = GatewayProcess(settings, tmp_path)
    try:
        clients = one_on_each(gateway, worker_pids(gateway))
        body = {**CHAT, "model": "od"}
        for client in clients.values():
            status, answer = client.call("POST", "/v1/chat/completions", body, KEY)
            assert status == 200 and json.loads(answer)["model"] == "m"
        ready = r'vllm_gateway_model_state\{model="od",state="ready"\}'
        wait_until(lambda: metric(gateway, ready) == 1, 60, "od started by the fallbacks")
        for client in clients.values():
            status, answer = client.call("POST", "/v1/chat/completions", body, KEY)
            assert status == 200 and json.loads(answer)["model"] == "od"
        assert metric(gateway, r'vllm_gateway_model_loads_total\{model="od"\}') == 1
    finally:
        gateway.close()


def od(gateway: GatewayProcess) -> dict[str, Any]:
    """The on-demand model, as /admin/models shows it (the control plane's)."""
    models = httpx.get(f"{gateway.url}/admin/models", headers={"Authorization": f"Bearer {KEY}"})
    found: dict[str, Any] = next(m for m in models.json()["data"] if m["name"] == "od")
    return found


def test_a_killed_worker_is_restarted_and_only_its_own_requests_fail(
    gateway: GatewayProcess, backend: FakeBackend
) -> None:
    clients = one_on_each(gateway, worker_pids(gateway))
    (victim, victim_client), (survivor, survivor_client) = clients.items()
    assert (
        victim_client.call("POST", "/v1/chat/completions", {**CHAT, "model": "od"}, KEY)[0] == 200
    )
    backends_before = {p for p in descendants(gateway.proc.pid) if alive(p)} - set(clients)
    statuses: list[int] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            statuses.append(survivor_client.call("POST", "/v1/chat/completions", CHAT, KEY)[0])

    held: list[BaseException] = []

    def hold() -> None:  # a stream on the victim, cut by its death
        body = {**CHAT, "stream": True, "fake": {"chunks": 200, "gap_ms": 50}}
        try:
            victim_client.call("POST", "/v1/chat/completions", body, KEY)
        except (http.client.HTTPException, OSError) as exc:  # the stream cut short
            held.append(exc)

    threads = [threading.Thread(target=loop), threading.Thread(target=hold)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(statuses) > 20, 20, "requests on the surviving worker")
    wait_until(
        lambda: metric(gateway, r'vllm_gateway_open_streams\{model="m"\}') == 1, 10, "the stream"
    )
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(worker_pids(gateway)) == 2 and victim not in worker_pids(gateway),
        30,
        "a new worker",
    )
    count = len(statuses)
    wait_until(lambda: len(statuses) > count + 20, 20, "more requests after the restart")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert held and set(statuses) == {200}
    assert survivor in worker_pids(gateway)
    assert backend.proc.poll() is None
    assert backends_before <= {p for p in descendants(gateway.proc.pid) if alive(p)}
    assert metric(gateway, r'vllm_gateway_requests_in_flight\{model="m"\}') == 0  # the stream's
    assert metric(gateway, r'vllm_gateway_model_state\{model="od",state="ready"\}') == 1
    row = worker_pids(gateway).index(survivor) ^ 1  # the victim's row
    assert metric(gateway, rf'vllm_gateway_worker_restarts_total\{{worker="{row}"\}}') == 1
    new = one_on_each(gateway, worker_pids(gateway))  # the new worker serves too
    assert {c.call("POST", "/v1/chat/completions", CHAT, KEY)[0] for c in new.values()} == {200}


def test_a_hung_worker_is_killed_and_started_again_while_the_other_keeps_serving(
    gateway: GatewayProcess, backend: FakeBackend
) -> None:
    """A worker whose event loop stops (SIGSTOP: it lives, it answers nothing) misses the
    control plane's liveness pings, is killed and started again; no backend is touched."""
    clients = one_on_each(gateway, worker_pids(gateway))
    (victim, _), (survivor, survivor_client) = clients.items()
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(
            lambda: len(worker_pids(gateway)) == 2 and victim not in worker_pids(gateway),
            40,
            "the hung worker replaced",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert survivor in worker_pids(gateway)
    assert survivor_client.call("POST", "/v1/chat/completions", CHAT, KEY)[0] == 200
    assert backend.proc.poll() is None
    row = worker_pids(gateway).index(survivor) ^ 1  # the victim's row
    assert metric(gateway, rf'vllm_gateway_worker_hangs_total\{{worker="{row}"\}}') == 1
    assert metric(gateway, rf'vllm_gateway_worker_restarts_total\{{worker="{row}"\}}') == 1
    assert "answered none of its last" in gateway.log.read_text(errors="replace")
    new = one_on_each(gateway, worker_pids(gateway))
    assert {c.call("POST", "/v1/chat/completions", CHAT, KEY)[0] for c in new.values()} == {200}


def test_one_worker_is_one_process(backend: FakeBackend, tmp_path: Path) -> None:
    gw = GatewayProcess(config(backend, workers=1, log_dir=str(tmp_path)), tmp_path)
    try:
        assert worker_pids(gw) == []
        assert (
            httpx.post(
                f"{gw.url}/v1/chat/completions",
                json=CHAT,
                headers={"Authorization": f"Bearer {KEY}"},
            ).status_code
            == 200
        )
    finally:
        gw.close()


def test_a_reload_reaches_every_worker(gateway: GatewayProcess, backend: FakeBackend) -> None:
    import yaml

    new = config(backend, log_dir=gateway.config["log_dir"], keep_backends=0)
    new["api_keys"].append({"name": "late", "key": "sk-late"})
    new["models"][0]["aliases"] = ["m-alias"]
    gateway.path.write_text(yaml.safe_dump(new))
    reload = httpx.post(f"{gateway.url}/admin/reload", headers={"Authorization": f"Bearer {KEY}"})
    assert reload.status_code == 200, reload.text
    seen: list[tuple[int, bytes]] = []

    def answered(client: Client) -> bool:
        seen.append(
            client.call("POST", "/v1/chat/completions", {**CHAT, "model": "m-alias"}, "sk-late")
        )
        return seen[-1][0] == 200

    for client in one_on_each(gateway, worker_pids(gateway)).values():
        try:
            wait_until(lambda c=client: answered(c), 10, "the new key and alias on this worker")
        except TimeoutError:
            lines = gateway.log.read_text(errors="replace").splitlines()
            log = [line for line in lines if "vllm_gateway.access" not in line][-40:]
            raise AssertionError(f"{client.worker}: {seen[-1]}\n" + "\n".join(log)) from None


def test_workers_stop_when_their_control_plane_is_killed(gateway: GatewayProcess) -> None:
    pids = worker_pids(gateway)
    assert len(pids) == 2
    gateway.proc.send_signal(signal.SIGKILL)
    gateway.proc.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in pids), 30, "the workers to stop")
