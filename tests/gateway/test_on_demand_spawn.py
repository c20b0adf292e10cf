"""On-demand models through the gateway, with the fake vLLM spawned as real servers are.

Timing properties (a stream longer than the idle TTL, the TTL itself) are shown here against
the paced fake; real vLLM goes through the same paths in tests/integration/test_on_demand.py.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.supervisor import Supervisor
from gateway.specs import backend_specs, on_demand_names
from tests.helpers import FAST_SPAWN, Output, wait_until
from tests.servers import FAKE_VLLM, GatewayProcess, GatewayServer, alive, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

ADMIN, USER = "sk-admin", "sk-user"
ONLY_B = "sk-only-b"
KEYS = [{"name": "ops", "key": ADMIN, "admin": True}, {"name": "app", "key": USER}]


def on_demand_model(name: str, idle_ttl: float = 30, **args: object) -> dict[str, Any]:
    """Shares of 0.6 on GPU 0: two such models never run together (the CPU ignores both)."""
    return {
        "name": name,
        "vllm": {"model": "fake", "gpus": [0], "args": {"gpu-memory-utilization": 0.6, **args}},
        "on_demand": {"idle_ttl": idle_ttl, "min_resident": 0, "start_timeout": 20},
    }


class OnDemandGateway:
    def __init__(
        self, tmp_path: Path, models: list[dict[str, Any]], keys: list[dict[str, Any]] = KEYS
    ) -> None:
        settings = gateway_settings(
            models, launcher=[sys.executable, FAKE_VLLM], log_dir=str(tmp_path), api_keys=keys
        )
        self.supervisor = Supervisor(
            backend_specs(settings),
            log_dir=tmp_path,
            timings=FAST_SPAWN,
            on_demand=on_demand_names(settings),
        )
        self.server = GatewayServer(settings, supervisor=self.supervisor)
        self.url = self.server.url

    def pid(self, name: str) -> int | None:
        return self.supervisor.backends[name].process.pid

    def running(self, name: str) -> bool:
        pid = self.pid(name)
        return pid is not None and alive(pid)

    def chat(self, model: str, key: str = USER, **extra: Any) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            json={"model": model, "messages": [], **extra},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def stream(self, model: str) -> list[str]:
        """The `data:` lines of one streamed chat, read as they come."""
        with httpx.stream(
            "POST",
            f"{self.url}/v1/chat/completions",
            json={"model": model, "messages": [], "stream": True},
            headers={"Authorization": f"Bearer {USER}"},
            timeout=30,
        ) as response:
            return [line for line in response.iter_lines() if line.startswith("data: ")]

    def admin(self, method: str, path: str, key: str = ADMIN) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.url}/admin{path}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def metric(self, line_start: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
        line = next(x for x in text.splitlines() if x.startswith(line_start))
        return float(line.rsplit(" ", 1)[1])


def gateway_waiting(url: str, model: str) -> float:
    """Requests the gateway at ``url`` holds for ``model``'s start (its metrics say)."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
    prefix = f'vllm_gateway_model_waiting_requests{{model="{model}"}} '
    return next(
        (float(x.removeprefix(prefix)) for x in text.splitlines() if x.startswith(prefix)), 0.0
    )


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[OnDemandGateway]:
    server = OnDemandGateway(
        tmp_path,
        [
            on_demand_model("a", **{"startup-delay": 0.5}),
            on_demand_model("b"),
            on_demand_model("paced", idle_ttl=0.5, chunks=20, **{"gap-ms": 100}),
        ],
        keys=[*KEYS, {"name": "team-b", "key": ONLY_B, "models": ["b"]}],
    )
    yield server
    server.server.close()


def test_eight_first_requests_share_one_start_and_say_how_long_they_waited(
    gateway: OnDemandGateway,
) -> None:
    assert gateway.pid("a") is None  # nothing starts before it is asked for
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: gateway.chat("a"), range(8)))
    assert [r.status_code for r in answers] == [200] * 8
    assert all(float(r.headers["x-vllm-gateway-start-wait"]) > 0.4 for r in answers)
    assert gateway.metric('vllm_gateway_model_loads_total{model="a"}') == 1
    assert gateway.metric('vllm_gateway_model_state{model="a",state="ready"}') == 1
    assert "x-vllm-gateway-start-wait" not in gateway.chat("a").headers  # no wait once up


def test_stopped_models_are_listed_and_a_key_cannot_start_what_it_cannot_call(
    gateway: OnDemandGateway,
) -> None:
    listed = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {USER}"})
    assert {m["id"] for m in listed.json()["data"]} == {"a", "b", "paced"}
    refused = gateway.chat("a", key=ONLY_B)
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"
    assert gateway.pid("a") is None  # the allow-list is checked before anything starts


def test_models_that_cannot_share_a_gpu_take_turns(gateway: OnDemandGateway) -> None:
    assert gateway.chat("a").status_code == 200
    first_a = gateway.pid("a")
    assert gateway.chat("b").status_code == 200
    assert first_a is not None and not alive(first_a)  # a made room for b
    assert gateway.chat("a").status_code == 200
    assert not gateway.running("b") and gateway.running("a")
    assert gateway.metric('vllm_gateway_model_loads_total{model="a"}') == 2


def test_a_stream_longer_than_the_idle_ttl_completes_then_the_model_stops(
    gateway: OnDemandGateway,
) -> None:
    began = time.monotonic()
    events = gateway.stream("paced")
    lasted = time.monotonic() - began
    assert lasted > 1.0  # two TTLs and more: the open stream kept the model up
    assert events[-1] == "data: [DONE]" and len(events) == 21
    assert gateway.running("paced")
    wait_until(lambda: not gateway.running("paced"), 10, "paced to stop once idle")


def test_admin_lists_loads_and_stops_models_and_writes_each_action_down(
    gateway: OnDemandGateway, capfd: pytest.CaptureFixture[str]
) -> None:
    assert gateway.admin("GET", "/models", key=USER).status_code == 403
    assert gateway.admin("POST", "/models/a/load", key=USER).status_code == 403
    listing = gateway.admin("GET", "/models").json()["data"]
    assert {m["name"]: m["state"] for m in listing} == {
        "a": "stopped",
        "b": "stopped",
        "paced": "stopped",
    }
    loaded = gateway.admin("POST", "/models/a/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert loaded.json()["last_load_s"] > 0.4 and gateway.running("a")
    stopped = gateway.admin("POST", "/models/a/stop")
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert not gateway.running("a")
    missing = gateway.admin("POST", "/models/nope/load")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    Output(capfd).wait_for(
        "action=load model=a key=ops result=ready", "action=stop model=a key=ops result=stopped"
    )


def test_the_old_unload_endpoint_still_stops_and_logs_that_it_is_deprecated(
    gateway: OnDemandGateway, caplog: pytest.LogCaptureFixture
) -> None:
    assert gateway.admin("POST", "/models/a/load").json()["state"] == "ready"
    unloaded = gateway.admin("POST", "/models/a/unload")
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "stopped"
    assert not gateway.running("a")
    warned = [r for r in caplog.records if r.name == "vllm_gateway.admin"]
    assert [r.levelname for r in warned] == ["WARNING"]
    assert "deprecated" in warned[0].getMessage()
    assert "POST /admin/models/a/stop" in warned[0].getMessage()


def test_a_model_that_cannot_start_answers_every_waiting_request_503(tmp_path: Path) -> None:
    broken = on_demand_model("broken")
    broken["vllm"]["env"] = {"FAKE_VLLM_EXIT_AT_START": "3"}  # as a bad model path would
    gateway = OnDemandGateway(tmp_path, [broken])
    try:
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: gateway.chat("broken"), range(3)))
    finally:
        gateway.server.close()
    for answer in answers:
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "model_not_started"
        assert "exited with code 3" in answer.json()["error"]["message"]
        assert int(answer.headers["retry-after"]) >= 1


def test_sigterm_answers_requests_waiting_for_a_start_at_once(tmp_path: Path) -> None:
    config = {
        "launcher": [sys.executable, FAKE_VLLM],
        "log_dir": str(tmp_path / "logs"),
        "api_keys": KEYS,
        "models": [on_demand_model("slow", **{"startup-delay": 60})],
    }
    gateway = GatewayProcess(config, tmp_path)
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            httpx.post,
            f"{gateway.url}/v1/chat/completions",
            json={"model": "slow", "messages": []},
            headers={"Authorization": f"Bearer {USER}"},
            timeout=30,
        )
        wait_until(lambda: gateway_waiting(gateway.url, "slow") == 1, 20, "a held request")
        assert not waiting.done()
        gateway.proc.send_signal(signal.SIGTERM)
        answer = waiting.result(10)
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "model_not_started"
    # uvicorn ends by re-raising the signal it caught, once everything has shut down
    assert gateway.proc.wait(20) == -signal.SIGTERM
    assert "Application shutdown complete" in gateway.log.read_text()
