"""On-demand models with real vLLM: started by requests, swapped on a shared GPU, stopped when
idle, loaded and stopped by an admin, refused cleanly when they cannot start.

Two tiny chat models on `gpus: [0]` with shares of 0.6 each cannot run together (vLLM's CPU
build ignores the GPU flags, so the swap logic runs as it would on a GPU). They listen on unix
sockets (`listen: unix`, what sleep mode uses), so real vLLM is reached that way too. Timing
properties (a stream outliving the idle TTL) are shown against the paced fake in
tests/gateway/test_on_demand_spawn.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import wait_until
from tests.integration.spawned import AUTH, vllm_servers
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS, CPU_ARGS, MODELS_DIR, cpu_env

pytestmark = pytest.mark.vllm

USER = "sk-on-demand-user"
IDLE_TTL = 20.0
START_TIMEOUT = 280.0


def on_demand(name: str, model: str, gpus: list[int], core: int) -> dict[str, object]:
    return {
        "name": name,
        "vllm": {
            "model": model,
            "gpus": gpus,
            "listen": "unix",  # as sleep mode would: real vLLM on a socket, not a port
            "args": {**CPU_ARGS, "max-model-len": 512, "gpu-memory-utilization": 0.6},
            "env": cpu_env(core),
        },
        "on_demand": {"idle_ttl": IDLE_TTL, "start_timeout": START_TIMEOUT, "min_resident": 0},
    }


@pytest.fixture(scope="module")
def gw(vllm: dict[str, str]) -> Iterator[GatewayProcess]:
    config = {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "spawned-on-demand"),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}, USER],
        "models": [
            on_demand("od-a", str(MODELS_DIR / "chat"), [0], core=0),
            on_demand("od-b", str(MODELS_DIR / "chat"), [0], core=1),
            on_demand("od-broken", str(MODELS_DIR / "no-such-model"), [1], core=1),
        ],
    }
    server = GatewayProcess(config, ARTIFACTS)
    yield server
    server.close()


def serving(gw: GatewayProcess) -> set[str]:
    """The models whose vLLM server runs below the gateway, from the process table."""
    names = set()
    for pid in vllm_servers(gw):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        if "--served-model-name" in args:
            names.add(args[args.index("--served-model-name") + 1])
    return names


def sdk(gw: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=USER, max_retries=0, timeout=300)


def ask(gw: GatewayProcess, model: str) -> str:
    answer = sdk(gw).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    return answer.choices[0].finish_reason or ""


def metric(gw: GatewayProcess, start: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10).text
    return float(next(x for x in text.splitlines() if x.startswith(start)).rsplit(" ", 1)[1])


def test_eight_first_requests_get_200_from_one_start(gw: GatewayProcess) -> None:
    assert serving(gw) == set()  # nothing runs before it is asked for
    with ThreadPoolExecutor(8) as pool:
        reasons = list(pool.map(lambda _: ask(gw, "od-a"), range(8)))
    assert reasons == ["length"] * 8
    assert metric(gw, 'vllm_gateway_model_loads_total{model="od-a"}') == 1
    assert serving(gw) == {"od-a"}
    (server,) = vllm_servers(gw)
    command = Path(f"/proc/{server}/cmdline").read_bytes().split(b"\0")
    assert b"--uds" in command and b"--port" not in command  # reached through its socket


def test_a_request_for_the_other_model_swaps_them_and_back(gw: GatewayProcess) -> None:
    assert ask(gw, "od-b") == "length"
    assert serving(gw) == {"od-b"}  # od-a was stopped to make room
    assert ask(gw, "od-a") == "length"
    assert serving(gw) == {"od-a"}
    assert metric(gw, 'vllm_gateway_model_loads_total{model="od-a"}') == 2


def test_admin_lists_stops_and_loads(gw: GatewayProcess) -> None:
    user = {"Authorization": f"Bearer {USER}"}
    assert httpx.get(f"{gw.url}/admin/models", headers=user).status_code == 403
    listing = httpx.get(f"{gw.url}/admin/models", headers=AUTH).json()["data"]
    states = {m["name"]: m["state"] for m in listing}
    assert states == {"od-a": "ready", "od-b": "stopped", "od-broken": "stopped"}
    stopped = httpx.post(f"{gw.url}/admin/models/od-a/stop", headers=AUTH, timeout=120)
    assert stopped.json()["state"] == "stopped" and serving(gw) == set()
    loaded = httpx.post(f"{gw.url}/admin/models/od-b/load", headers=AUTH, timeout=300)
    assert loaded.json()["state"] == "ready" and serving(gw) == {"od-b"}
    assert "action=stop model=od-a key=ops result=stopped" in gw.log.read_text()


def test_idle_ttl_after_the_last_response_the_server_is_gone(gw: GatewayProcess) -> None:
    assert ask(gw, "od-b") == "length"
    last = time.monotonic()
    wait_until(lambda: not serving(gw), IDLE_TTL + 60, "od-b to stop when idle", every=0.5)
    assert time.monotonic() - last >= IDLE_TTL - 1


def test_a_model_that_cannot_load_answers_503_to_every_waiting_request(
    gw: GatewayProcess,
) -> None:
    def call(_: int) -> httpx.Response:
        body = {"model": "od-broken", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {USER}"}
        return httpx.post(
            f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=START_TIMEOUT + 20
        )

    began = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(call, range(3)))
    assert time.monotonic() - began < START_TIMEOUT
    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "model_not_started"
        assert "retry-after" in answer.headers
    log = gw.log.read_text()
    assert "od-broken: start failed" in log and "no-such-model" in log
