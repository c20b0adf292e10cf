"""LoRA adapters through the gateway, with the fake vLLM (which serves and loads adapters as
vLLM answers); real vLLM: tests/integration/test_lora.py."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from backends.adapters import AdapterBook
from backends.pool import Replica
from backends.supervisor import Supervisor
from gateway.admin_adapters import _load_everywhere
from gateway.errors import BadGateway
from gateway.specs import backend_specs
from tests.helpers import FAST_SPAWN, wait_until
from tests.servers import FAKE_VLLM, FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEYS = [
    {"name": "ops", "key": "sk-admin", "admin": True},
    {"name": "app", "key": "sk-app"},
    {"name": "sql-team", "key": "sk-sql", "models": ["sql"]},
    {"name": "tone-team", "key": "sk-tone", "models": ["tone"]},  # loaded later, at runtime
]
BASE = {
    "name": "m",
    "vllm": {
        "model": "fake",
        "replicas": 2,
        "lora": {"adapters": {"sql": "/adapters/sql"}, "max_rank": 8, "runtime": True},
    },
}


class LoraGateway:
    def __init__(self, tmp_path: Path) -> None:
        settings = gateway_settings(
            [BASE], launcher=[sys.executable, FAKE_VLLM], log_dir=str(tmp_path), api_keys=KEYS
        )
        self.supervisor = Supervisor(backend_specs(settings), log_dir=tmp_path, timings=FAST_SPAWN)
        self.server = GatewayServer(settings, supervisor=self.supervisor)
        self.url = self.server.url
        wait_until(lambda: self.states() == ["ready", "ready"], 15, "both replicas")

    def states(self) -> list[str]:
        return [str(r.state) for r in self.supervisor.replicas("m")]

    def call(self, model: str, key: str = "sk-app") -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/chat/completions",
            json={"model": model, "messages": []},
            headers={"Authorization": f"Bearer {key}"},
        )

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = f"{self.url}/admin/models/m/adapters{path}"
        return httpx.request(method, url, headers={"Authorization": "Bearer sk-admin"}, **kwargs)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[LoraGateway]:
    server = LoraGateway(tmp_path)
    yield server
    server.server.close()


def test_a_static_adapter_is_a_model_of_its_own(gateway: LoraGateway) -> None:
    cards = httpx.get(f"{gateway.url}/v1/models", headers={"Authorization": "Bearer sk-app"})
    assert {c["id"]: c.get("parent") for c in cards.json()["data"]} == {"m": None, "sql": "m"}
    assert gateway.call("sql").json()["model"] == "sql"  # the backend saw the adapter's name
    assert gateway.call("sql", "sk-sql").status_code == 200
    assert gateway.call("m", "sk-sql").status_code == 404  # an adapter's key cannot call the base


def test_a_runtime_adapter_loads_everywhere_and_is_gone_after_its_unload(
    gateway: LoraGateway,
) -> None:
    assert gateway.call("tone").status_code == 404
    loaded = gateway.admin("POST", "", json={"name": "tone", "path": "/adapters/tone"})
    assert loaded.status_code == 200 and loaded.json()["replicas"] == 2
    assert all("tone" in r.adapters for r in gateway.supervisor.replicas("m"))
    assert [gateway.call("tone", "sk-tone").status_code for _ in range(4)] == [200] * 4
    assert gateway.admin("POST", "", json={"name": "tone", "path": "/x"}).status_code == 409
    assert gateway.admin("POST", "", json={"name": "m", "path": "/x"}).status_code == 409
    bad = gateway.admin("POST", "", json={"name": "x", "path": "/missing"})
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "adapter_not_found"
    assert gateway.admin("DELETE", "/tone").status_code == 200
    gone = gateway.call("tone")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert gateway.admin("DELETE", "/tone").status_code == 404


def test_a_restarted_replica_gets_the_runtime_adapters_before_it_is_admitted(
    gateway: LoraGateway,
) -> None:
    assert gateway.admin("POST", "", json={"name": "tone", "path": "/t"}).status_code == 200
    victim = gateway.supervisor.backends["m#0"]
    pid = victim.process.pid
    assert pid is not None
    os.killpg(pid, signal.SIGKILL)  # the replica's whole tree, as a crash would
    wait_until(lambda: victim.replica.restarts == 1, 15, "the restart to begin")
    wait_until(lambda: gateway.states() == ["ready", "ready"], 15, "the restart")
    assert "tone" in victim.replica.adapters
    assert [gateway.call("tone").status_code for _ in range(6)] == [200] * 6


async def test_a_partial_load_is_undone_and_names_the_replica_that_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    good = FakeBackend("m")
    monkeypatch.setenv("FAKE_VLLM_LORA_FAILS", "1")
    bad = FakeBackend("m")
    try:
        replicas = [Replica(url=good.url), Replica(url=bad.url)]
        with pytest.raises(BadGateway) as failed:
            await _load_everywhere(replicas, "tone", "/adapters/tone")
        assert bad.url in failed.value.message and good.url not in failed.value.message
        models = httpx.get(f"{good.url}/v1/models").json()["data"]
        assert [c["id"] for c in models] == ["m"]  # unloaded again where it had loaded
        assert replicas[0].adapters == replicas[1].adapters == frozenset()
    finally:
        good.close()
        bad.close()


def test_adapter_names_may_not_clash_with_model_names() -> None:
    from gateway.config_file import ConfigError, settings_from_dict

    clash = {**BASE, "vllm": {**BASE["vllm"], "lora": {"adapters": {"m": "/a"}}}}  # type: ignore[dict-item]
    with pytest.raises(ConfigError) as info:
        settings_from_dict({"models": [clash]}, env={})
    assert info.value.problems == ["models[0]: adapter 'm' is already the name of models[0] (m)"]


def test_the_book_remembers_runtime_adapters_per_base_model() -> None:
    book = AdapterBook()
    book.add("m", "tone", "/t")
    book.add("m", "sql", "/s")
    book.remove("m", "sql")
    assert book.of("m") == {"tone": "/t"} and book.of("other") == {}
