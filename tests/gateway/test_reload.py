"""Reloading the config of a running gateway (`vllm-gateway serve`, fake vLLM servers): only
what changed is touched, and every request of a client loop is answered meanwhile.

Real vLLM does the same in tests/integration/test_reload.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers import StreamReader, wait_until
from tests.servers import FAKE_VLLM, FakeBackend, GatewayProcess, descendants

pytestmark = pytest.mark.servers  # starts processes on loopback

ADMIN = "sk-reload-admin"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def spawned(name: str, replicas: int = 1, **args: object) -> dict[str, Any]:
    return {"name": name, "vllm": {"model": "fake", "replicas": replicas, "args": dict(args)}}


def config(*models: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "launcher": [sys.executable, FAKE_VLLM],
        "api_keys": [{"name": "ops", "key": ADMIN, "admin": True}],
        "models": list(models),
        **extra,
    }


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def start(workdir: Path, cfg: dict[str, Any]) -> GatewayProcess:
    gw = GatewayProcess({**cfg, "log_dir": str(workdir / "logs")}, workdir)
    for model in cfg["models"]:
        wait_until(lambda m=model: chat(gw, m["name"]).status_code == 200, 30, model["name"])
    return gw


def rewrite(gw: GatewayProcess, cfg: dict[str, Any]) -> None:
    gw.path.write_text(yaml.safe_dump({**cfg, "log_dir": gw.config["log_dir"]}))


def chat(gw: GatewayProcess, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [], **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)


def reload(gw: GatewayProcess, dry_run: bool = False) -> httpx.Response:
    query = "?dry_run=true" if dry_run else ""
    return httpx.post(f"{gw.url}/admin/reload{query}", headers=AUTH, timeout=120)


def servers(gw: GatewayProcess, name: str) -> set[int]:
    """The fake vLLM server processes of one model (not their reapers)."""
    found = set()
    for pid in descendants(gw.proc.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if FAKE_VLLM.encode() not in argv or b"backends.reaper" in argv:
            continue
        if name.encode() in argv[argv.index(b"--served-model-name") + 1 :][:1]:
            found.add(pid)
    return found


class ClientLoop:
    """Chats with one model again and again, from a thread, until stopped; keeps every status."""

    def __init__(
        self, gw: GatewayProcess, model: str, ask: Callable[..., httpx.Response] | None = None
    ) -> None:
        """``ask(gw, model)``: one chat (default: this module's, for fake servers)."""
        self.statuses: list[int] = []
        self._ask = ask or chat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(gw, model), daemon=True)
        self._thread.start()
        wait_until(lambda: len(self.statuses) >= 3, 60, f"requests to {model}")

    def _run(self, gw: GatewayProcess, model: str) -> None:
        while not self._stop.is_set():
            self.statuses.append(self._ask(gw, model).status_code)

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join(60)
        return self.statuses


@pytest.fixture
def three(workdir: Path) -> Iterator[tuple[GatewayProcess, dict[str, Any]]]:
    cfg = config(spawned("a"), spawned("b"), spawned("c"))
    gw = start(workdir, cfg)
    yield gw, cfg
    gw.close()


def test_a_reload_restarts_only_the_model_whose_flags_changed_and_holds_its_requests(
    three: tuple[GatewayProcess, dict[str, Any]],
) -> None:
    gw, cfg = three
    before = {m: servers(gw, m) for m in "abc"}
    loops = {m: ClientLoop(gw, m) for m in "abc"}
    cfg["models"][2] = spawned("c", **{"max-model-len": 1024, "startup-delay": 1.0})
    rewrite(gw, cfg)
    answer = reload(gw)
    statuses = {m: loop.stop() for m, loop in loops.items()}
    assert answer.status_code == 200, answer.text
    actions = {m["name"]: m["action"] for m in answer.json()["models"]}
    assert actions == {"a": "unchanged", "b": "unchanged", "c": "restart"}
    assert servers(gw, "a") == before["a"] and servers(gw, "b") == before["b"]
    assert servers(gw, "c") and servers(gw, "c").isdisjoint(before["c"])
    for model, seen in statuses.items():
        assert set(seen) == {200}, f"{model}: {sorted(set(seen))}"  # held, never refused
    status = httpx.get(f"{gw.url}/status.json", headers=AUTH).json()["config"]
    assert status["generation"] == 2 and status["last_reload"]["result"] == "applied"


def test_a_model_of_two_replicas_restarts_them_in_turn_and_keeps_serving(workdir: Path) -> None:
    cfg = config(spawned("pair", replicas=2))
    gw = start(workdir, cfg)
    try:
        before = servers(gw, "pair")
        assert len(before) == 2
        loop = ClientLoop(gw, "pair")
        cfg["models"][0] = spawned("pair", replicas=2, **{"startup-delay": 0.5})
        rewrite(gw, cfg)
        assert reload(gw).status_code == 200
        seen = loop.stop()
        assert set(seen) == {200}, sorted(set(seen))
        after = servers(gw, "pair")
        assert len(after) == 2 and after.isdisjoint(before)
        log = gw.log.read_text()
        log = log[log.index("pair: restarting for the new config") :]
        assert log.index("pair#0: ready") < log.index("pair#1: starting")  # one at a time
    finally:
        gw.close()


def test_a_reload_adds_and_removes_models_and_a_stream_on_a_removed_one_ends_intact(
    workdir: Path,
) -> None:
    cfg = config(spawned("keep"), spawned("gone", chunks=30, **{"gap-ms": 50}))
    gw = start(workdir, cfg)
    try:
        doomed = servers(gw, "gone")
        body = {"model": "gone", "messages": [], "stream": True}
        reader = StreamReader(f"{gw.url}/v1/chat/completions", body, AUTH)
        rewrite(gw, config(spawned("keep"), spawned("new")))
        assert reload(gw).status_code == 200
        assert chat(gw, "gone").status_code == 404  # at once, while its stream goes on
        wait_until(lambda: chat(gw, "new").status_code == 200, 30, "the new model serving")
        events = [line for line in reader.join() if line]
        assert events[-1] == "data: [DONE]" and len(events) == 31
        wait_until(lambda: not servers(gw, "gone"), 30, "the removed model's server gone")
        assert all(not Path(f"/proc/{pid}").exists() for pid in doomed)
        listed = httpx.get(f"{gw.url}/v1/models", headers=AUTH).json()["data"]
        assert sorted(m["id"] for m in listed) == ["keep", "new"]
    finally:
        gw.close()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"models": [{"name": "a", "vllm": {"model": "fake", "argz": {}}}]}, "argz"),
        ({"host": "127.0.0.2"}, "needs a new listener"),
        ({"workers": 2}, "workers: 1 -> 2 needs a new listener"),
        ({"models": [spawned("a", **{"gpu-memory-utilization": 2})]}, "not in (0, 1]"),
        ({"limits_store": "redis://127.0.0.1:9/0"}, "limits_store: the counters"),
    ],
    ids=["invalid", "new-listener", "new-workers", "layout-that-cannot-work", "limits-store"],
)
def test_a_rejected_reload_changes_nothing_and_says_why(
    three: tuple[GatewayProcess, dict[str, Any]], change: dict[str, Any], problem: str
) -> None:
    gw, cfg = three
    before = {m: servers(gw, m) for m in "abc"}
    rewrite(gw, {**cfg, **change})
    answer = reload(gw)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "config_rejected" and problem in error["message"]
    assert {m: servers(gw, m) for m in "abc"} == before
    assert all(chat(gw, m).status_code == 200 for m in "abc")
    assert "config not reloaded" in gw.log.read_text()
    metrics = httpx.get(f"{gw.url}/metrics", headers=AUTH).text
    assert 'vllm_gateway_config_reloads_total{result="rejected"} 1.0' in metrics


def test_a_dry_run_answers_the_plan_and_changes_nothing(
    three: tuple[GatewayProcess, dict[str, Any]],
) -> None:
    gw, _ = three
    before = servers(gw, "a")
    rewrite(gw, config(spawned("a", **{"max-model-len": 512}), spawned("b"), spawned("d")))
    answer = reload(gw, dry_run=True)
    assert answer.status_code == 200
    plan = {m["name"]: (m["action"], m["why"]) for m in answer.json()["models"]}
    assert plan["a"] == ("restart", "its servers' command changes: vllm.args.max-model-len")
    assert plan["b"][0] == "unchanged" and plan["c"][0] == "stop" and plan["d"][0] == "start"
    assert servers(gw, "a") == before and chat(gw, "c").status_code == 200


def test_sighup_reloads_the_config_and_watch_config_follows_the_file(workdir: Path) -> None:
    cfg = config(spawned("a"))
    gw = start(workdir, cfg)
    try:
        watched = config(spawned("a"), spawned("b"), watch_config=True)
        rewrite(gw, watched)
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_until(lambda: chat(gw, "b").status_code == 200, 30, "b added by SIGHUP")
        assert "config applied (SIGHUP): b: start" in gw.log.read_text()
        rewrite(gw, {**watched, "models": [spawned("a"), spawned("c")]})  # now watched
        wait_until(lambda: chat(gw, "c").status_code == 200, 30, "c added by the file watch")
        assert "config applied (watch): c: start, b: stop" in gw.log.read_text()
    finally:
        gw.close()


def test_a_connect_mode_models_urls_change_as_discovered_pods_do(workdir: Path) -> None:
    """The new URL joins once its checks pass; the old one leaves once its requests end; the
    model answers every request meanwhile."""
    old, new = FakeBackend("m"), FakeBackend("m")
    health = {"interval": 0.2, "healthy_threshold": 1}
    cfg = config({"name": "m", "urls": [old.url], "health": health})
    gw = start(workdir, cfg)
    try:
        loop = ClientLoop(gw, "m")
        rewrite(gw, config({"name": "m", "urls": [new.url], "health": health}))
        assert reload(gw).status_code == 200
        wait_until(lambda: new.stats()["started"] > 0, 30, "requests on the new URL")
        served_before = old.stats()["started"]
        wait_until(lambda: new.stats()["started"] > 5, 30, "more requests on the new URL")
        assert set(loop.stop()) == {200}
        assert old.stats()["started"] == served_before  # the old URL gets no new request
        status = httpx.get(f"{gw.url}/status.json", headers=AUTH).json()
        (model,) = status["models"]
        assert [r["url"] for r in model["replicas"]] == [new.url]
    finally:
        gw.close()
        old.close()
        new.close()
