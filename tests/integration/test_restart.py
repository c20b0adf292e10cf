"""The gateway restarts; the models do not: real vLLM servers outlive their gateway and are
adopted by the next one (`keep_backends`), or end themselves when no gateway comes.

One story in order, two tiny chat models, at most two servers at a time: a SIGTERM, a
SIGKILL, a changed model, a recorded pid that now belongs to another process, and no gateway
at all; then an on-demand model left asleep and a model balanced by prefix, both adopted (the
sleeper woken by its next request, the other's KV events read again). Each test leaves the
next one a running gateway (or none). keep-b is an on-demand model, started by its first
request: kept while it serves, adopted `ready` without a start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from backends.proctree import group_members
from tests.helpers import wait_until
from tests.integration.spawned import AUTH, tiny_chat
from tests.servers import GatewayProcess, alive
from tests.vllm_rig import ARTIFACTS

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig

KEEP = 40.0  # seconds the servers wait for the next gateway
READY = 290.0  # a cold start of two tiny servers on two cores
MODELS = ("keep-a", "keep-b")


def model(name: str, core: int, max_len: int = 512) -> dict[str, object]:
    return tiny_chat(name, core, max_len)


def on_demand(model: dict[str, object]) -> dict[str, object]:
    """Started by its first request; never idle long enough here to stop."""
    return {**model, "on_demand": {"idle_ttl": 3600, "start_timeout": READY, "min_resident": 0}}


def config(a_len: int = 512) -> dict[str, object]:
    return {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(LOGS),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "keep_backends": KEEP,
        "models": [model("keep-a", 0, a_len), on_demand(model("keep-b", 1))],
    }


LOGS = ARTIFACTS / "restart"
STATE = LOGS / "state"


class Story:
    gateway: GatewayProcess | None = None
    started_at = 0.0  # when the current gateway was asked to start

    def start(self, cfg: dict[str, object]) -> GatewayProcess:
        self.started_at = time.monotonic()
        self.gateway = GatewayProcess(cfg, ARTIFACTS)
        return self.gateway

    def end_gateway(self, sig: int) -> None:
        assert self.gateway is not None
        self.gateway.proc.send_signal(sig)
        self.gateway.proc.wait(60)
        self.gateway = None


@pytest.fixture(scope="module")
def story(request: pytest.FixtureRequest) -> Iterator[Story]:
    # In the whole suite, once the rig's eight servers are gone; run alone (`--noconftest`),
    # there is no rig to stop.
    with contextlib.suppress(pytest.FixtureLookupError):
        request.getfixturevalue("rig_stopped")
    stop_backends = [sys.executable, "-m", "gateway", "stop-backends", "--config", _write()]
    subprocess.run(stop_backends, check=True)  # what an earlier, interrupted run left
    told = Story()
    yield told
    if told.gateway is not None:
        told.end_gateway(signal.SIGTERM)
    subprocess.run(stop_backends, check=True)


def _write(cfg: dict[str, object] | None = None) -> str:
    import yaml

    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / "config.yaml"
    path.write_text(yaml.safe_dump(cfg or config()))
    return str(path)


def chat(gw: GatewayProcess, name: str) -> int:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    try:
        url = f"{gw.url}/v1/chat/completions"
        return httpx.post(url, json=body, headers=AUTH, timeout=30).status_code
    except httpx.HTTPError:
        return 0


def records() -> dict[str, dict[str, object]]:
    return {p.stem: json.loads(p.read_text()) for p in STATE.glob("*.json")}


def servers() -> dict[str, int]:
    """Model name -> pid of every vLLM API server of this story, from the whole process
    table (an adopted server is no descendant of the gateway that adopted it)."""
    found: dict[str, int] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "vllm.entrypoints.openai.api_server" not in argv or "backends.reaper" in argv:
            continue
        if "--served-model-name" in argv and alive(int(entry.name)):
            name = argv[argv.index("--served-model-name") + 1]
            if name in MODELS:
                assert name not in found, f"two servers of {name}"
                found[name] = int(entry.name)
    return found


def every_model_answers(gw: GatewayProcess) -> bool:
    return all(chat(gw, name) == 200 for name in MODELS)


def first_answers_within(story: Story, gw: GatewayProcess, seconds: float) -> None:
    """Counted from the gateway's own start (uvicorn's first line), not from the fork: on this
    shared 2-core machine, importing the gateway alone has taken 10 s under load."""
    wait_until(lambda: every_model_answers(gw), 30, "the first chat to every model", every=0.1)
    answered = time.time()
    line = next(x for x in gw.log.read_text().splitlines() if "Started server process" in x)
    began = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    print(
        f"first chats {answered - began:.1f}s after the gateway's start, "
        f"{time.monotonic() - story.started_at:.1f}s after its fork"
    )
    assert answered - began < seconds


def test_no_process_lists_a_backend_key_in_its_arguments(story: Story) -> None:
    gw = story.start(config())
    wait_until(lambda: every_model_answers(gw), READY, "both models", every=1)
    keys = [str(r["api_key"]) for r in records().values()]
    assert len(keys) == 2
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert not any(key in argv for key in keys), f"pid {entry.name} shows a backend key"
    for name in MODELS:
        assert not any(key in (LOGS / f"{name}.log").read_text() for key in keys)
    assert (STATE.stat().st_mode & 0o777) == 0o700
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in STATE.glob("*.json"))


def test_after_a_sigterm_the_next_gateway_adopts_every_server(story: Story) -> None:
    before = servers()
    assert set(before) == set(MODELS)
    story.end_gateway(signal.SIGTERM)
    assert servers() == before  # the gateway is gone, its servers are not
    gw = story.start(config())
    first_answers_within(story, gw, 5.0)
    assert servers() == before
    assert model_state(gw, "keep-b") == "ready"
    assert load_count(gw, "keep-b") == 0  # adopted, not started


def model_state(gw: GatewayProcess, name: str) -> str:
    listing = httpx.get(f"{gw.url}/admin/models", headers=AUTH, timeout=10).json()["data"]
    return str(next(m["state"] for m in listing if m["name"] == name))


def load_count(gw: GatewayProcess, name: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", headers=AUTH, timeout=10).text
    prefix = f'vllm_gateway_model_loads_total{{model="{name}"}} '
    return next(float(x.removeprefix(prefix)) for x in text.splitlines() if x.startswith(prefix))


def test_after_a_sigkill_the_next_gateway_adopts_every_server(story: Story) -> None:
    before = servers()
    story.end_gateway(signal.SIGKILL)
    assert servers() == before
    gw = story.start(config())
    first_answers_within(story, gw, 5.0)
    assert servers() == before


def test_a_changed_model_starts_fresh_and_the_other_is_adopted(story: Story) -> None:
    before = servers()
    old_a = records()["keep-a"]["pgid"]
    story.end_gateway(signal.SIGTERM)
    gw = story.start(config(a_len=256))
    wait_until(lambda: chat(gw, "keep-b") == 200, 5.0, "keep-b, adopted", every=0.1)
    assert not group_members(int(str(old_a)))  # ended as a whole tree before the new start
    wait_until(lambda: chat(gw, "keep-a") == 200, READY, "keep-a, started fresh", every=1)
    after = servers()
    assert after["keep-b"] == before["keep-b"]
    assert after["keep-a"] != before["keep-a"]


def test_a_recorded_pid_that_is_now_another_process_is_not_adopted(story: Story) -> None:
    """The reaper of keep-b dies with its tree; its pid is then another process's (here: the
    record is pointed at a live stranger with the dead reaper's start time)."""
    before = servers()
    story.end_gateway(signal.SIGTERM)
    record = records()["keep-b"]
    os.killpg(int(str(record["pgid"])), signal.SIGTERM)
    wait_until(lambda: not group_members(int(str(record["pgid"]))), 60, "keep-b's tree to end")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as stranger:
        try:
            path = STATE / "keep-b.json"
            path.write_text(json.dumps({**record, "pgid": stranger.pid}))
            gw = story.start(config(a_len=256))
            wait_until(lambda: chat(gw, "keep-a") == 200, 5.0, "keep-a, adopted", every=0.1)
            wait_until(lambda: chat(gw, "keep-b") == 200, READY, "keep-b, fresh", every=1)
            assert stranger.poll() is None  # not signalled
        finally:
            stranger.kill()
    after = servers()
    assert after["keep-a"] == before["keep-a"]
    assert after["keep-b"] != before.get("keep-b")


def test_servers_nobody_adopts_end_themselves_after_keep_backends(story: Story) -> None:
    groups = [int(str(r["pgid"])) for r in records().values()]
    trees = {pid for group in groups for pid in group_members(group)}
    assert len(groups) == 2 and len(trees) >= 4  # reaper, API server, engine core each
    story.end_gateway(signal.SIGKILL)
    ended = time.monotonic()
    assert all(alive(pid) for pid in trees)
    wait_until(lambda: not any(alive(pid) for pid in trees), KEEP + 60, "every tree to end")
    assert time.monotonic() - ended >= KEEP - 1  # they waited for a gateway first


# On-demand models that sleep, and a model balanced by prefix (its KV-event socket): the next
# gateway adopts both as they were. vLLM's CPU build does not free memory asleep, but it
# sleeps and wakes by the same API (tests/integration/cpu_sleep.py, the launcher here).
SLEEPY, PREFIXED = "keep-sleepy", "keep-prefix"
LONG = "Tides and berths. " * 30  # more than a block of 128 tokens: its events are published


def sleep_config() -> dict[str, object]:
    sleepy = {
        **model(SLEEPY, 0),
        "on_demand": {
            "unload": "sleep",
            "sleep_level": 1,
            "idle_ttl": 3600,
            "min_resident": 0,
            "start_timeout": READY,
        },
    }
    return {
        "launcher": ["python", "-m", "tests.integration.cpu_sleep"],
        "log_dir": str(LOGS),
        "api_keys": [{"name": "ops", "key": "sk-spawn", "admin": True}],
        "keep_backends": KEEP,
        "models": [sleepy, {**model(PREFIXED, 1), "balance": "prefix"}],
    }


def api_server(label: str) -> int:
    """The vLLM API server of a recorded backend (not its reaper, not its engine core)."""
    group = int(str(records()[label]["pgid"]))
    for member in group_members(group):
        argv = Path(f"/proc/{member}/cmdline").read_bytes().split(b"\0")
        if b"tests.integration.cpu_sleep" in argv and b"backends.reaper" not in argv:
            return member
    raise AssertionError(f"no API server of {label} in group {group}")


def state(gw: GatewayProcess, name: str) -> str:
    listing = httpx.get(f"{gw.url}/admin/models", headers=AUTH, timeout=30).json()["data"]
    return str(next(m["state"] for m in listing if m["name"] == name))


def events_arrived(gw: GatewayProcess) -> int:
    """A new long prompt to the prefix model (new blocks: its server publishes that it stored
    them), then how many KV-event feeds have had a message."""
    content = f"{time.monotonic_ns()} {LONG}"
    body = {"model": PREFIXED, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    url = f"{gw.url}/v1/chat/completions"
    assert httpx.post(url, json=body, headers=AUTH, timeout=120).status_code == 200
    return gw.log.read_text(errors="replace").count("KV-cache events arriving")


def test_an_asleep_server_is_adopted_asleep_and_its_next_request_wakes_it(story: Story) -> None:
    gw = story.start(sleep_config())
    wait_until(lambda: chat(gw, SLEEPY) == 200, READY, "the on-demand model started", every=1)
    wait_until(lambda: chat(gw, PREFIXED) == 200, READY, "the prefix model", every=1)
    asleep = httpx.post(f"{gw.url}/admin/models/{SLEEPY}/sleep", headers=AUTH, timeout=120)
    assert asleep.status_code == 200 and asleep.json()["state"] == "asleep"
    wait_until(lambda: events_arrived(gw) == 1, 60, "the prefix model's KV events", every=1)
    before = {name: api_server(name) for name in (SLEEPY, PREFIXED)}
    assert records()[SLEEPY]["asleep_level"] == 1
    story.end_gateway(signal.SIGTERM)
    assert all(alive(pid) for pid in before.values())  # left running, one of them asleep
    gw = story.start(sleep_config())
    wait_until(lambda: chat(gw, PREFIXED) == 200, 30, "the prefix model, adopted", every=0.2)
    assert state(gw, SLEEPY) == "asleep"
    assert {name: api_server(name) for name in before} == before  # adopted, both
    wait_until(lambda: events_arrived(gw) == 1, 60, "KV events, read again", every=1)
    assert chat(gw, SLEEPY) == 200  # woken by its request
    assert state(gw, SLEEPY) == "ready" and api_server(SLEEPY) == before[SLEEPY]
    assert records()[SLEEPY]["asleep_level"] == 0
