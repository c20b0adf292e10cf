"""Reloading the config with real vLLM servers: three spawned tiny chat models answer a client
loop each while a reload changes one model's vLLM flags; only that model's server is started
again, and its requests are held until it serves, never refused.

The same with fake servers, and every other kind of change, is in tests/gateway/test_reload.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.gateway.test_reload import ClientLoop
from tests.helpers import wait_until
from tests.integration.spawned import AUTH, api_servers, tiny_chat
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

READY = 290.0  # three cold starts on two cores


def model(name: str, core: int, max_len: int = 256) -> dict[str, object]:
    return tiny_chat(name, core, max_len)


def config(c_len: int = 256) -> dict[str, object]:
    return {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "reload"),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "keep_backends": 0,
        "models": [model("r-a", 0), model("r-b", 1), model("r-c", 0, c_len)],
    }


def served_by(gw: GatewayProcess) -> dict[str, int]:
    """Each model's vLLM api_server pid, by the model name on its command line."""
    found = {}
    for pid in api_servers(gw.proc.pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found[argv[argv.index(b"--served-model-name") + 1].decode()] = pid
    return found


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    server = GatewayProcess(config(), ARTIFACTS)
    try:
        for name in ("r-a", "r-b", "r-c"):
            wait_until(lambda n=name: chat(server, n).status_code == 200, READY, f"{name} up")
        yield server
    finally:
        server.close()


def chat(gw: GatewayProcess, name: str) -> httpx.Response:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def test_only_the_changed_model_restarts_and_every_request_is_answered(
    gw: GatewayProcess,
) -> None:
    before = served_by(gw)
    assert sorted(before) == ["r-a", "r-b", "r-c"]
    loops = {name: ClientLoop(gw, name, chat) for name in before}
    gw.path.write_text(yaml.safe_dump({**config(c_len=384), "log_dir": gw.config["log_dir"]}))
    answer = httpx.post(f"{gw.url}/admin/reload", headers=AUTH, timeout=READY)
    statuses = {name: loop.stop() for name, loop in loops.items()}
    assert answer.status_code == 200, answer.text
    actions = {m["name"]: m["action"] for m in answer.json()["models"]}
    assert actions == {"r-a": "unchanged", "r-b": "unchanged", "r-c": "restart"}
    after = served_by(gw)
    assert after["r-a"] == before["r-a"] and after["r-b"] == before["r-b"]  # untouched
    assert after["r-c"] != before["r-c"]  # started again with its new flag
    for name, seen in statuses.items():
        assert set(seen) == {200}, f"{name}: {sorted(set(seen))} in {len(seen)} requests"
    listed = httpx.get(f"{gw.url}/v1/models", headers=AUTH).json()["data"]
    assert {m["id"]: m.get("max_model_len") for m in listed}["r-c"] == 384
