"""LoRA adapters with real vLLM: a static adapter of the connect-mode chat server, and runtime
adapters loaded on both replicas of the spawned chat model (which the replica test then kills
one of: see test_replicas.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import KEY, SQL_KEY
from tests.integration.spawned import AUTH
from tests.servers import GatewayProcess
from tests.vllm_rig import LORA, VllmRig

pytestmark = pytest.mark.vllm
PROMPT = {"prompt": "hello world", "max_tokens": 12, "temperature": 0}


def complete(url: str, key: str, model: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": model, **PROMPT},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def text(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["text"])


def test_a_static_adapter_is_listed_with_its_parent(gateway: GatewayProcess) -> None:
    def cards(key: str) -> dict[str, dict[str, object]]:
        listing = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        return {c["id"]: c for c in listing.json()["data"]}

    assert cards(KEY)["sql"]["parent"] == "tiny-chat"
    limited = cards(SQL_KEY)
    assert set(limited) == {"sql"} and "parent" not in limited["sql"]  # the base is not its


def test_the_adapter_answers_as_vllm_does_and_unlike_the_base(
    gateway: GatewayProcess, vllm: dict[str, str]
) -> None:
    via = text(complete(gateway.url, KEY, "sql"))
    direct = httpx.post(f"{vllm['tiny-chat']}/v1/completions", json={"model": "sql", **PROMPT})
    assert via == direct.json()["choices"][0]["text"]
    assert via != text(complete(gateway.url, KEY, "tiny-chat"))
    usage = httpx.get(
        f"{gateway.url}/metrics", headers={"Authorization": "Bearer sk-integration-monitor"}
    ).text
    assert 'model="sql"' in usage  # counted under its own name


def test_a_key_limited_to_the_adapter_cannot_call_the_base(gateway: GatewayProcess) -> None:
    assert complete(gateway.url, SQL_KEY, "sql").status_code == 200
    refused = complete(gateway.url, SQL_KEY, "tiny-chat")
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_a_runtime_adapter_loads_on_every_replica_serves_and_unloads(rig: VllmRig) -> None:
    gw = rig.spawned["mixed"]
    admin = f"{gw.url}/admin/models/spawned-chat/adapters"
    loaded = httpx.post(admin, json={"name": "tone", "path": str(LORA)}, headers=AUTH, timeout=120)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["replicas"] == 2
    again = httpx.post(admin, json={"name": "tone", "path": str(LORA)}, headers=AUTH, timeout=60)
    assert again.status_code == 409
    missing = httpx.post(admin, json={"name": "x", "path": "/no/such/dir"}, headers=AUTH)
    assert missing.status_code == 404 and "/no/such/dir" in missing.json()["error"]["message"]
    for _ in range(4):  # both replicas hold it: whichever answers, it answers
        assert text(complete(gw.url, "sk-spawn", "tone"))
    unloaded = httpx.delete(f"{admin}/tone", headers=AUTH, timeout=60)
    assert unloaded.status_code == 200
    gone = complete(gw.url, "sk-spawn", "tone")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
