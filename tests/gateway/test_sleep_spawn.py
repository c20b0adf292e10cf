"""Sleep mode through the gateway, with the fake vLLM's sleep endpoints (which count every
misuse a real vLLM would crash or hang on). The GPU run in load/results shows real vLLM."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gateway.test_on_demand_spawn import ADMIN, USER, OnDemandGateway, on_demand_model
from tests.helpers import StreamReader, wait_until
from tests.servers import alive, descendants

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def sleeper(name: str, level: int = 1, idle_ttl: float = 30, **args: object) -> dict[str, Any]:
    model = on_demand_model(name, idle_ttl=idle_ttl, **args)
    model["on_demand"].update(unload="sleep", sleep_level=level)
    return model


def deep_sleeper_with_adapters(name: str) -> dict[str, Any]:
    """Level 2, runtime LoRA, and a fake that forgets runtime adapters in its deep sleep."""
    model = sleeper(name, level=2, idle_ttl=0.5)
    model["vllm"]["lora"] = {"runtime": True, "max_rank": 8}
    model["vllm"]["env"] = {"FAKE_VLLM_DEEP_SLEEP_DROPS_ADAPTERS": "1"}
    return model


class SleepGateway(OnDemandGateway):
    def stats(self, name: str) -> dict[str, int]:
        replica = self.supervisor.backends[name].replica
        with httpx.Client(transport=httpx.HTTPTransport(uds=replica.uds)) as client:
            result: dict[str, int] = client.get(f"{replica.url}/fake/stats").json()
        return result

    def state(self, name: str) -> str:
        listing = self.admin("GET", "/models").json()["data"]
        return str(next(m["state"] for m in listing if m["name"] == name))


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[SleepGateway]:
    server = SleepGateway(
        tmp_path,
        [
            sleeper("one", level=1, idle_ttl=0.5),
            sleeper("two", level=2, idle_ttl=0.5),
            sleeper("paced", chunks=20, **{"gap-ms": 100}),
            sleeper("wakeless", idle_ttl=0.5, **{"fail-wake": True}),
            deep_sleeper_with_adapters("deep"),
        ],
    )
    yield server
    server.server.close()


@pytest.mark.parametrize("name", ["one", "two"])
def test_an_idle_model_falls_asleep_and_the_next_request_wakes_it(
    gateway: SleepGateway, name: str
) -> None:
    assert gateway.chat(name).status_code == 200
    pid = gateway.pid(name)
    wait_until(lambda: gateway.state(name) == "asleep", 10, f"{name} asleep")
    assert pid is not None and alive(pid)  # asleep, not stopped
    woken = gateway.chat(name)
    assert woken.status_code == 200 and "x-vllm-gateway-start-wait" in woken.headers
    assert gateway.pid(name) == pid  # woken, not restarted
    stats = gateway.stats(name)
    assert (stats["sleeps"], stats["wakes"], stats["violations"]) == (1, 1, 0)
    assert gateway.metric(f'vllm_gateway_model_wakes_total{{model="{name}"}}') == 1


def test_a_model_sleeps_only_once_its_stream_has_ended(gateway: SleepGateway) -> None:
    events: list[str] = []

    def stream() -> None:
        events.extend(gateway.stream("paced"))

    reader = threading.Thread(target=stream)
    reader.start()
    wait_until(lambda: gateway.state("paced") == "ready", 10, "paced up")
    wait_until(lambda: gateway.stats("paced")["started"] == 1, 10, "the stream under way")
    asleep = gateway.admin("POST", "/models/paced/sleep")
    reader.join(10)
    assert asleep.status_code == 200 and asleep.json()["state"] == "asleep"
    assert events[-1] == "data: [DONE]" and len(events) == 21  # intact
    assert gateway.stats("paced")["violations"] == 0


def test_a_wake_that_fails_restarts_the_server_and_the_request_is_served(
    gateway: SleepGateway,
) -> None:
    assert gateway.chat("wakeless").status_code == 200
    first = gateway.pid("wakeless")
    wait_until(lambda: gateway.state("wakeless") == "asleep", 10, "wakeless asleep")
    assert gateway.chat("wakeless").status_code == 200
    assert first is not None and not alive(first) and gateway.pid("wakeless") != first


def test_models_that_cannot_share_a_gpu_swap_by_sleeping(gateway: SleepGateway) -> None:
    assert gateway.chat("one").status_code == 200
    one = gateway.pid("one")
    assert gateway.chat("two").status_code == 200
    assert gateway.state("one") == "asleep" and one is not None and alive(one)
    assert gateway.chat("one").status_code == 200
    assert gateway.state("two") == "asleep" and gateway.pid("one") == one
    assert gateway.stats("one")["violations"] == gateway.stats("two")["violations"] == 0


@pytest.mark.parametrize(
    "path", ["/sleep", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache"]
)
def test_vllm_dev_paths_are_never_relayed(gateway: SleepGateway, path: str) -> None:
    for method in ("GET", "POST"):
        answer = httpx.request(
            method, f"{gateway.url}{path}", headers={"Authorization": f"Bearer {USER}"}
        )
        assert answer.status_code == 404, (method, path)


def test_a_woken_server_gets_back_the_runtime_adapters_its_sleep_dropped(
    gateway: SleepGateway,
) -> None:
    assert gateway.chat("deep").status_code == 200
    adapters = f"{gateway.url}/admin/models/deep/adapters"
    loaded = httpx.post(adapters, json={"name": "deep-tone", "path": "/t"}, headers=ADMIN_AUTH)
    assert loaded.status_code == 200
    wait_until(lambda: gateway.state("deep") == "asleep", 10, "deep asleep")
    woken = gateway.chat("deep-tone")  # wakes the base model; the adapter must be back
    assert woken.status_code == 200, woken.text
    assert "deep-tone" in gateway.supervisor.backends["deep"].replica.adapters


def test_a_sleep_mode_server_listens_only_on_a_socket_no_one_else_may_reach(
    gateway: SleepGateway,
) -> None:
    """vLLM's dev endpoints take no key: the server has no TCP port at all, and its socket
    lies in a directory only the gateway's user may enter."""
    assert gateway.chat("one").status_code == 200
    backend = gateway.supervisor.backends["one"]
    socket_path = Path(backend.replica.uds or "")
    assert socket_path.is_socket()
    assert socket_path.parent.stat().st_mode & 0o777 == 0o700
    pid = backend.process.pid
    assert pid is not None
    commands = [
        Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0") for child in descendants(pid)
    ]
    server = next(c for c in commands if b"--served-model-name" in c)
    assert b"--uds" in server and b"--port" not in server


def test_a_server_that_dies_while_its_model_drains_is_stopped_then_started_by_the_wake(
    tmp_path: Path,
) -> None:
    """Two servers of one sleep-mode model; a stream holds the first while the model drains
    for a sleep, and the second is killed meanwhile. The second is not restarted (a restart
    would take its whole GPU share while the model is booked asleep): the model falls asleep
    on the first, and the next request wakes the first and starts the second afresh."""
    model = sleeper("pair", chunks=20, **{"gap-ms": 100, "gpu-memory-utilization": 0.4})
    model["vllm"].update(gpus=[[0], [0]], replicas=2)
    gateway = SleepGateway(tmp_path, [model])
    try:
        first, second = (gateway.supervisor.backends[f"pair#{i}"] for i in (0, 1))
        body = {"model": "pair", "messages": [], "stream": True}
        auth = {"Authorization": f"Bearer {USER}"}
        reader = StreamReader(f"{gateway.url}/v1/chat/completions", body, auth)
        wait_until(lambda: second.replica.state == "ready", 20, "the second server up")
        answers: list[httpx.Response] = []
        sleeper_call = threading.Thread(
            target=lambda: answers.append(gateway.admin("POST", "/models/pair/sleep"))
        )
        sleeper_call.start()
        wait_until(lambda: gateway.state("pair") == "draining", 10, "pair draining")
        doomed = second.process.pid
        assert doomed is not None
        os.killpg(doomed, signal.SIGKILL)  # the reaper leads the server's process group
        lines = reader.join()
        sleeper_call.join(20)
        assert answers and answers[0].json()["state"] == "asleep"
        assert "data: [DONE]" in lines  # the stream on the first server ended intact
        assert (first.replica.state, second.replica.state) == ("asleep", "stopped")
        assert second.process.pid == doomed and not alive(doomed)  # nobody restarted it
        asleep_pid = first.process.pid
        assert gateway.chat("pair").status_code == 200
        assert first.process.pid == asleep_pid  # woken, not restarted
        wait_until(lambda: second.replica.state == "ready", 20, "the second started afresh")
        assert second.process.pid not in (None, doomed)
    finally:
        gateway.server.close()
