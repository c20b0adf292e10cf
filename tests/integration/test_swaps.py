"""The swap scheduler with real vLLM: two tiny chat models on `gpus: [0]` with shares of 0.6
each, which cannot run together (vLLM's CPU build ignores the GPU flags, so the swap logic runs
as on a GPU), under the cost policy.

- Batching: while `sw-a` is in use, a request for `sw-b` waits out the batch window, and the
  requests for `sw-a` sent meanwhile are served at once, before the swap.
- Deadlines: a request that allows less than the estimated start (the gateway measured the
  first one) is answered 503 `max_wait_exceeded` at once, with Retry-After and the estimate.

It starts its own servers, once the session rig has stopped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.spawned import AUTH
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS, CPU_ARGS, MODELS_DIR, cpu_env

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

WINDOW = 20.0
START = 300.0  # seconds a request may wait for a start on 2 busy cores


def on_demand(name: str, core: int) -> dict[str, object]:
    return {
        "name": name,
        "vllm": {
            "model": str(MODELS_DIR / "chat"),
            "gpus": [0],
            "args": {**CPU_ARGS, "max-model-len": 512, "gpu-memory-utilization": 0.6},
            "env": cpu_env(core),
        },
        "on_demand": {"idle_ttl": 600, "start_timeout": START, "min_resident": 0},
    }


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    config = {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "spawned-swaps"),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "models": [on_demand("sw-a", 0), on_demand("sw-b", 1)],
        "swaps": {"policy": "cost", "batch_window": WINDOW},
    }
    server = GatewayProcess(config, ARTIFACTS)
    yield server
    server.close()


def chat(gw: GatewayProcess, model: str, max_wait: float | None = None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    headers = {**AUTH, **({"x-vllm-gateway-max-wait": f"{max_wait:g}"} if max_wait else {})}
    url = f"{gw.url}/v1/chat/completions"
    return httpx.post(url, json=body, headers=headers, timeout=START + 60)


def models(gw: GatewayProcess) -> dict[str, dict[str, object]]:
    listing = httpx.get(f"{gw.url}/admin/models", headers=AUTH, timeout=10).json()["data"]
    return {m["name"]: m for m in listing}


def test_a_resident_in_use_serves_its_requests_first_for_the_batch_window(
    gw: GatewayProcess,
) -> None:
    assert chat(gw, "sw-b").status_code == 200  # both were started once: sw-b, then sw-a
    for _ in range(12):  # sw-a in use: a dozen requests in a few seconds
        assert chat(gw, "sw-a").status_code == 200
    assert models(gw)["sw-b"]["state"] == "stopped"
    with ThreadPoolExecutor(1) as pool:
        asked = time.monotonic()
        other = pool.submit(chat, gw, "sw-b")
        during = []
        while time.monotonic() - asked < WINDOW - 5:
            answer = chat(gw, "sw-a")
            during.append(answer)
            time.sleep(1)
        swapped = other.result()
    assert swapped.status_code == 200
    assert float(swapped.headers["x-vllm-gateway-start-wait"]) >= WINDOW  # the window first
    assert during and all(a.status_code == 200 for a in during)
    assert all("x-vllm-gateway-start-wait" not in a.headers for a in during)  # none waited
    listing = models(gw)
    assert listing["sw-b"]["state"] == "ready" and listing["sw-a"]["state"] == "stopped"
    assert listing["sw-a"]["swapped_out"] >= 1


def test_a_request_that_allows_less_than_the_estimated_start_is_refused_at_once(
    gw: GatewayProcess,
) -> None:
    measured = models(gw)["sw-a"]["costs"]["seconds"]["start"]  # type: ignore[index]
    assert measured is not None and measured > 2
    asked = time.monotonic()
    answer = chat(gw, "sw-a", max_wait=2)
    assert time.monotonic() - asked < measured  # answered before a start could have ended
    assert answer.status_code == 503, answer.text
    error = answer.json()["error"]
    assert error["code"] == "max_wait_exceeded"
    assert "would take about" in error["message"] and "x-vllm-gateway-max-wait" in error["message"]
    assert int(answer.headers["retry-after"]) >= 2
    assert models(gw)["sw-a"]["refused"]["deadline"] == 1  # type: ignore[index]
    metrics = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10).text
    assert 'vllm_gateway_model_cost_seconds{model="sw-a",phase="start"}' in metrics
    assert 'vllm_gateway_model_refused_total{model="sw-a",reason="deadline"} 1.0' in metrics
