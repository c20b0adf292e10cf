"""A `balance: prefix` model that a reload adds is fed by its real vLLM server's KV-cache
events: the reload starts the server with its publisher on, and the gateway subscribes to it
then, not only at its own start. One tiny spawned server, once the session rig has stopped.

In-process, every other way the feeds follow a reload is in tests/gateway/test_prefix_reload.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import yaml

from tests.helpers import wait_until
from tests.integration.spawned import AUTH, tiny_chat
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

READY = 290.0  # a cold start on two shared cores
ADDED = "kv-added"
LONG = "Tides and berths. " * 30  # more than a block of 128 tokens: its events are published


def config(*models: dict[str, object]) -> dict[str, object]:
    placeholder = {"name": "placeholder", "url": "http://127.0.0.1:9"}  # nothing listens
    return {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "prefix-reload"),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "models": [placeholder, *models],
    }


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    server = GatewayProcess(config(), ARTIFACTS)
    try:
        yield server
    finally:
        server.close()


def chat(gw: GatewayProcess, content: str) -> int:
    body = {"model": ADDED, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    try:
        url = f"{gw.url}/v1/chat/completions"
        return httpx.post(url, json=body, headers=AUTH, timeout=120).status_code
    except httpx.HTTPError:
        return 0


def arrivals(gw: GatewayProcess) -> list[str]:
    """The subscribers' first-message lines (backends/kv_events.py logs one per feed)."""
    lines = gw.log.read_text(errors="replace").splitlines()
    return [line for line in lines if "KV-cache events arriving" in line]


def test_a_prefix_model_a_reload_adds_feeds_its_index_with_its_servers_events(
    gw: GatewayProcess,
) -> None:
    added = {**tiny_chat(ADDED, 0, 512), "balance": "prefix"}
    gw.path.write_text(yaml.safe_dump({**config(added), "log_dir": gw.config["log_dir"]}))
    answer = httpx.post(f"{gw.url}/admin/reload", headers=AUTH, timeout=READY)
    assert answer.status_code == 200, answer.text
    actions = {m["name"]: m["action"] for m in answer.json()["models"]}
    assert actions == {"placeholder": "unchanged", ADDED: "start"}
    wait_until(lambda: chat(gw, "hi") == 200, READY, f"{ADDED}, started by the reload", every=1)
    assert arrivals(gw) == []  # nothing stored yet: a prompt shorter than a block

    def published() -> bool:
        assert chat(gw, f"{len(arrivals(gw))} {LONG}") == 200  # new blocks: stored, published
        return len(arrivals(gw)) == 1

    wait_until(published, 60, "the added model's KV events", every=1)
    (line,) = arrivals(gw)
    assert f"{ADDED}:ipc://" in line  # its own feed, on the socket the reload gave it
