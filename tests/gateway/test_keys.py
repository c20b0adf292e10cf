"""API keys: where they come from, what each may reach, how fast, and rotation without restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from gateway.config_file import ConfigError, settings_from_dict
from gateway.keys import ApiKey, key_ring
from tests.helpers import bearer, wait_until
from tests.servers import FakeBackend, GatewayProcess, running_gateway

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

CHAT = {"name": "tiny-chat", "aliases": ["chat"], "url": "http://127.0.0.1:9"}
EMBED = {"name": "tiny-embed", "url": "http://127.0.0.1:9"}


def write_keys(path: Path, *entries: dict[str, object]) -> None:
    path.write_text(yaml.safe_dump({"keys": list(entries)}))


def test_keys_from_config_environment_and_file_are_all_active(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    write_keys(
        keys_file,
        {"name": "hashed", "sha256": hashlib.sha256(b"sk-file").hexdigest()},
    )
    settings = settings_from_dict(
        {
            "models": [CHAT],
            "api_keys": ["sk-plain", {"name": "team-a", "key": "sk-team"}],
            "keys_file": str(keys_file),
        },
        env={"VLLM_GATEWAY_API_KEYS": "sk-env1, sk-env2"},
    )
    ring = key_ring(settings)
    named = {k: ring.identify(k.encode()) for k in ["sk-plain", "sk-team", "sk-env2", "sk-file"]}
    assert {k: v.name for k, v in named.items() if v} == {
        "sk-plain": "config-1",
        "sk-team": "team-a",
        "sk-env2": "env-2",
        "sk-file": "hashed",
    }
    assert ring.identify(b"sk-nobody") is None


def test_a_keys_file_of_thousands_of_hashed_keys(tmp_path: Path) -> None:
    """Lookup is by digest: a large team's keys file costs no more per request than one key."""
    keys_file = tmp_path / "keys.yaml"
    entries = [
        {"name": f"user-{n}", "sha256": hashlib.sha256(f"sk-user-{n}".encode()).hexdigest()}
        for n in range(5_000)
    ]
    write_keys(keys_file, *entries)
    ring = key_ring(settings_from_dict({"models": [CHAT], "keys_file": str(keys_file)}, env={}))
    found = ring.identify(b"sk-user-1234")
    assert found is not None and found.name == "user-1234"
    assert ring.identify(b"sk-user-5000") is None


def test_a_bad_keys_file_stops_start_up_with_each_problem_named(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    write_keys(
        keys_file, {"name": "a", "key": "k1", "models": ["gpt-4"]}, {"name": "a", "key": "k2"}
    )
    settings = settings_from_dict({"models": [CHAT], "keys_file": str(keys_file)}, env={})
    with pytest.raises(ConfigError) as info:
        key_ring(settings)
    assert info.value.problems == [
        "keys.a: model 'gpt-4' is not configured",
        "keys.a: the name is used twice",
    ]


def test_an_empty_keys_file_locks_the_gateway(tmp_path: Path, fake: FakeBackend) -> None:
    """No key in force is not the same as no keys configured: every request is refused."""
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    models = [{"name": fake.name, "url": fake.url}]
    with running_gateway(models, keys_file=str(tmp_path / "keys.yaml")) as gateway:
        body = {"model": fake.name, "messages": []}
        for headers in ({}, bearer("sk-anything")):
            answer = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers)
            assert answer.status_code == 401
        assert httpx.get(f"{gateway.url}/v1/models").status_code == 401
    assert fake.stats()["started"] == 0


@pytest.fixture
def two_models() -> Iterator[tuple[FakeBackend, FakeBackend]]:
    chat, embed = FakeBackend("tiny-chat"), FakeBackend("tiny-embed")
    yield chat, embed
    chat.close()
    embed.close()


def test_a_key_sees_only_its_models(two_models: tuple[FakeBackend, FakeBackend]) -> None:
    chat, embed = two_models
    models = [{**CHAT, "url": chat.url}, {**EMBED, "url": embed.url}]
    keys = [{"name": "rag", "key": "sk-rag", "models": ["tiny-embed"]}, "sk-admin"]
    with running_gateway(models, api_keys=keys) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-rag", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny-embed"]
        assert client.embeddings.create(model="tiny-embed", input="hi").data
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "x"}]
            )
        assert "tiny-chat" not in str(info.value) and "Available models: tiny-embed" in str(
            info.value
        )
        admin = httpx.get(f"{gateway.url}/v1/models", headers=bearer("sk-admin")).json()
        assert [m["id"] for m in admin["data"]] == ["tiny-chat", "chat", "tiny-embed"]


def test_requests_per_minute_over_the_limit_get_429_with_retry_after(fake: FakeBackend) -> None:
    keys = [{"name": "slow", "key": "sk-slow", "requests_per_minute": 2}, "sk-other"]
    with running_gateway([{"name": fake.name, "url": fake.url}], api_keys=keys) as gateway:
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-slow", max_retries=0)
        ask = {"model": fake.name, "messages": [{"role": "user", "content": "x"}]}
        client.chat.completions.create(**ask)
        client.chat.completions.create(**ask)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**ask)
        assert info.value.response.headers["retry-after"] == "30"  # one request per 30 s
        assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        other = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-other", max_retries=0)
        assert other.chat.completions.create(**ask).choices  # limits are per key


def test_concurrent_requests_over_the_limit_get_429_until_one_finishes(fake: FakeBackend) -> None:
    keys = [{"name": "one", "key": "sk-one", "max_concurrent": 1}]
    url_models = [{"name": fake.name, "url": fake.url}]
    with running_gateway(url_models, api_keys=keys) as gateway:
        url = f"{gateway.url}/v1/chat/completions"
        slow = {"model": fake.name, "messages": [], "fake": {"gap_ms": 150, "chunks": 4}}
        first: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: first.append(httpx.post(url, json=slow, headers=bearer("sk-one")))
        )
        thread.start()
        wait_until(lambda: fake.stats()["started"] == 1, 5, "the first request to start")
        second = httpx.post(url, json=slow, headers=bearer("sk-one"))
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        thread.join()
        assert first[0].status_code == 200
        assert httpx.post(url, json=slow, headers=bearer("sk-one")).status_code == 200


def test_keys_file_changes_apply_without_restart(
    tmp_path: Path, fake: FakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    keys_file = tmp_path / "keys.yaml"
    write_keys(keys_file, {"name": "old", "key": "sk-old"})
    models = [{"name": fake.name, "url": fake.url}]
    with running_gateway(models, keys_file=str(keys_file)) as gateway:
        url = f"{gateway.url}/v1/models"
        assert httpx.get(url, headers=bearer("sk-old")).status_code == 200
        write_keys(keys_file, {"name": "new", "key": "sk-new"})
        wait_until(
            lambda: httpx.get(url, headers=bearer("sk-new")).status_code == 200, 5, "the new key"
        )
        assert httpx.get(url, headers=bearer("sk-old")).status_code == 401
        keys_file.write_text("keys: [{name: broken}]\n")  # a bad edit keeps the keys in force
        wait_until(lambda: "keys file not reloaded" in caplog.text, 10, "the failed reload")
        assert httpx.get(url, headers=bearer("sk-new")).status_code == 200


def test_a_keys_file_half_written_is_not_applied(tmp_path: Path) -> None:
    """A change counts once two looks agree, and an empty file is taken as one being written:
    a writer that truncates the file and writes it in pieces locks nobody out meanwhile."""
    keys_file = tmp_path / "keys.yaml"
    old, new = {"name": "old", "key": "sk-old"}, {"name": "new", "key": "sk-new"}
    write_keys(keys_file, old)
    ring = key_ring(settings_from_dict({"models": [CHAT], "keys_file": str(keys_file)}, env={}))

    async def rotate() -> None:
        keys_file.write_text("")  # truncated, for longer than two looks
        await ring.look()
        await ring.look()
        assert ring.identify(b"sk-old") is not None
        write_keys(keys_file, new)  # the first entry written: valid YAML, but not the file
        await ring.look()
        assert ring.identify(b"sk-old") is not None and ring.identify(b"sk-new") is None
        write_keys(keys_file, new, old)  # the whole file
        await ring.look()
        await ring.look()  # two looks agree: applied
        assert ring.identify(b"sk-new") is not None and ring.identify(b"sk-old") is not None
        keys_file.write_text("keys: []\n")  # an explicit lockout does apply
        await ring.look()
        await ring.look()
        assert ring.identify(b"sk-new") is None

    asyncio.run(rotate())


def test_a_keys_file_changing_while_read_is_read_again(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    write_keys(keys_file, {"name": "old", "key": "sk-old"})
    ring = key_ring(settings_from_dict({"models": [CHAT], "keys_file": str(keys_file)}, env={}))
    read = ring._read_file

    def read_while_written(path: Path) -> list[ApiKey]:
        keys = read(path)
        write_keys(keys_file, {"name": "late", "key": "sk-late"})  # changed under the reader
        return keys

    write_keys(keys_file, {"name": "early", "key": "sk-early"})
    ring._read_file = read_while_written  # type: ignore[method-assign]
    assert asyncio.run(ring.reload()) is False
    assert ring.identify(b"sk-old") is not None and ring.identify(b"sk-early") is None


def test_sighup_reloads_the_keys_file(tmp_path: Path, fake: FakeBackend) -> None:
    """Even an edit the file watcher cannot see (same size, same inode, old mtime)."""
    keys_file = tmp_path / "keys.yaml"
    write_keys(keys_file, {"name": "k", "key": "sk-aaaa"})
    before = os.stat(keys_file)
    config = {"models": [{"name": fake.name, "url": fake.url}], "keys_file": str(keys_file)}
    gateway = GatewayProcess(config, tmp_path)
    try:
        url = f"{gateway.url}/v1/models"
        assert httpx.get(url, headers=bearer("sk-aaaa")).status_code == 200
        with open(keys_file, "r+") as f:
            f.write(keys_file.read_text().replace("sk-aaaa", "sk-bbbb"))
        os.utime(keys_file, ns=(before.st_atime_ns, before.st_mtime_ns))
        gateway.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: httpx.get(url, headers=bearer("sk-bbbb")).status_code == 200, 5, "SIGHUP"
        )
        assert httpx.get(url, headers=bearer("sk-aaaa")).status_code == 401
        assert "sk-bbbb" not in gateway.log.read_text()  # keys are never logged
    finally:
        gateway.close()
