"""`balance: prefix` with real vLLM: two spawned tiny-chat replicas whose caches hold two
conversations each, not four, so only routing each conversation to one replica keeps them
cached (least outstanding, one request at a time, would send all four to the first replica,
which evicts each before its next turn; load/prefix_cache.py measures both).

It starts exactly the two servers it needs, once the session rig has stopped.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import wait_until
from tests.integration.spawned import AUTH, vllm_servers
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS, CPU_ARGS, MODELS_DIR, cpu_env

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

BLOCKS = 12  # of 128 tokens per replica: two conversations of ~4-5 blocks fit, four do not
CONVERSATIONS, TURNS = 4, 3
READY = 280.0


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    args = {**CPU_ARGS, "max-model-len": 1024, "num-gpu-blocks-override": BLOCKS}
    model = {
        "name": "prefix-chat",
        "balance": "prefix",
        "vllm": {
            "model": str(MODELS_DIR / "chat"),
            "replicas": 2,
            "args": args,
            "env": cpu_env(0),
        },
    }
    config = {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "spawned-prefix"),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "models": [model],
    }
    server = GatewayProcess(config, ARTIFACTS)
    try:
        wait_until(lambda: _ready(server) == 2, READY, "two prefix-chat replicas")
        yield server
    finally:
        server.close()


def _ready(gw: GatewayProcess) -> int:
    doc = httpx.get(f"{gw.url}/status.json", headers=AUTH, timeout=10).json()
    return int(doc["models"][0]["ready"])


def _replica_urls(gw: GatewayProcess) -> list[str]:
    doc = httpx.get(f"{gw.url}/status.json", headers=AUTH, timeout=10).json()
    return [r["url"] for r in doc["models"][0]["replicas"]]


def _prefix_cache(url: str) -> tuple[float, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    hits = sum(
        float(v) for v in re.findall(r"^vllm:prefix_cache_hits_total\{.*\} (\S+)", text, re.M)
    )
    queries = re.findall(r"^vllm:prefix_cache_queries_total\{.*\} (\S+)", text, re.M)
    return hits, sum(float(v) for v in queries)


def test_spawned_servers_publish_their_kv_events(gw: GatewayProcess) -> None:
    for pid in vllm_servers(gw):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        config = json.loads(args[args.index("--kv-events-config") + 1])
        assert config["enable_kv_cache_events"] and config["endpoint"].startswith("ipc://")


def test_each_conversation_stays_where_its_prefix_is_cached(gw: GatewayProcess) -> None:
    before = [_prefix_cache(url) for url in _replica_urls(gw)]
    conversations = [
        [{"role": "system", "content": f"Harbour office {c}. " + "Tides and berths. " * 50}]
        for c in range(CONVERSATIONS)  # about 500 tokens each
    ]
    for turn in range(TURNS):
        for messages in conversations:
            messages.append({"role": "user", "content": f"Question {turn}?"})
            body = {"model": "prefix-chat", "messages": messages, "max_tokens": 4,
                    "temperature": 0}  # fmt: skip
            response = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH,
                                  timeout=120)  # fmt: skip
            assert response.status_code == 200, response.text
            answer = response.json()["choices"][0]["message"]["content"] or ""
            messages.append({"role": "assistant", "content": answer})
    after = [_prefix_cache(url) for url in _replica_urls(gw)]
    hits = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    queries = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    assert hits / queries > 0.5  # the later turns found their prefixes
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10).text
    routes: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "vllm_gateway_prefix_routes_total":
                routes[(s.labels["replica"], s.labels["route"])] = s.value
    assert routes[("0", "new")] == routes[("1", "new")] == CONVERSATIONS / 2  # spread
    assert sum(v for (_, route), v in routes.items() if route == "prefix") == CONVERSATIONS * (
        TURNS - 1
    )


def test_the_gateway_receives_both_servers_kv_events(gw: GatewayProcess) -> None:
    """Once each server stored a block, its publisher has reached the gateway's subscriber
    (backends/kv_events.py logs its first message)."""
    for c in ("one", "two"):  # two new prompts of a few blocks: one to each replica
        content = f"Conversation {c}. " + "Tides and berths. " * 30
        body = {"model": "prefix-chat", "messages": [{"role": "user", "content": content}],
                "max_tokens": 1}  # fmt: skip
        response = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)
        assert response.status_code == 200

    def arriving() -> int:
        return gw.log.read_text(errors="replace").count("KV-cache events arriving")

    wait_until(lambda: arriving() == 2, 60, "KV-cache events from both servers")
