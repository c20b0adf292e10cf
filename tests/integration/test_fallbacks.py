"""Fallbacks with real vLLM servers: two tiny chat models the gateway spawns, `fb-short`
(on demand, a 128-token context) falling back to `fb-long` (always on, 512 tokens).

While `fb-short` is stopped, its request goes to `fb-long` at once and `fb-short` starts all
the same; once it serves, a prompt longer than its context is refused by vLLM itself (its 400,
whose message the gateway knows) and answered by `fb-long`. Every other case, with backends
served in-process, is in tests/gateway/test_fallbacks.py and test_fallback_cold.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.traffic.reasons import context_refusal
from tests.helpers import wait_until
from tests.integration.spawned import AUTH, tiny_chat
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

READY = 290.0  # a cold start on two busy cores
SHORT_ONLY = {"Authorization": "Bearer sk-short-only"}
METRIC = "vllm_gateway_fallbacks_total"
LONG_PROMPT = "the quick brown fox jumps over the lazy dog " * 10  # ~270 tokens in the chat


def config() -> dict[str, object]:
    short = {
        **tiny_chat("fb-short", 0, 128),
        "on_demand": {"idle_ttl": 3600},
        "fallbacks": ["fb-long"],
    }
    return {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "fallbacks"),
        "api_keys": [
            {"name": "ops", "key": "sk-spawn", "admin": True},
            {"name": "short-only", "key": "sk-short-only", "models": ["fb-short"]},
        ],
        "keep_backends": 0,
        "models": [short, tiny_chat("fb-long", 1, 512)],
    }


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    server = GatewayProcess(config(), ARTIFACTS)
    try:
        wait_until(lambda: state(server, "fb-long") == "ready", READY, "fb-long up")
        yield server
    finally:
        server.close()


def chat(
    gw: GatewayProcess, model: str, prompt: str = "hi", auth: dict[str, str] = AUTH
) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=auth, timeout=120)


def state(gw: GatewayProcess, model: str) -> str | None:
    try:
        models = httpx.get(f"{gw.url}/admin/models", headers=AUTH, timeout=10).json()["data"]
    except httpx.HTTPError:
        return None
    return str(next(m["state"] for m in models if m["name"] == model))


def fallbacks(gw: GatewayProcess, reason: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10).text
    labels = {"model": "fb-short", "to": "fb-long", "reason": reason}
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return next((s.value for s in samples if s.name == METRIC and s.labels == labels), 0.0)


def test_a_stopped_model_sends_its_request_to_the_ready_fallback_and_starts_meanwhile(
    gw: GatewayProcess,
) -> None:
    assert state(gw, "fb-short") == "stopped"
    answer = chat(gw, "fb-short")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-vllm-gateway-model"] == "fb-long"
    assert answer.json()["model"] == "fb-long"  # vLLM was asked for the name it serves
    assert fallbacks(gw, "unavailable") == 1
    wait_until(lambda: state(gw, "fb-short") == "ready", READY, "fb-short started")
    own = chat(gw, "fb-short")
    assert (own.status_code, own.headers["x-vllm-gateway-model"]) == (200, "fb-short")


def test_a_prompt_longer_than_the_models_context_goes_to_the_longer_fallback(
    gw: GatewayProcess,
) -> None:
    wait_until(lambda: state(gw, "fb-short") == "ready", READY, "fb-short started")
    refused = chat(gw, "fb-short", LONG_PROMPT, auth=SHORT_ONLY)  # may not call fb-long
    assert refused.status_code == 400, refused.text
    assert refused.headers["x-vllm-gateway-model"] == "fb-short"
    refusal = context_refusal(refused.content)  # vLLM's own message, as it sends it
    assert refusal is not None and refusal.limit == 128, refused.text
    answer = chat(gw, "fb-short", LONG_PROMPT)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-vllm-gateway-model"] == "fb-long"
    assert answer.json()["usage"]["prompt_tokens"] > 128
    assert fallbacks(gw, "context_length") == 1
