"""`limits_store` in the config: a Redis URL or a mapping, the URL from the environment in
Kubernetes, the password from the environment only, and a change refused on reload."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config_file import ConfigError, settings_from_dict
from gateway.reload_plan import plan_reload
from gateway.settings import GatewaySettings

MODELS = [{"name": "m", "url": "http://127.0.0.1:9"}]


def load(env: dict[str, str] | None = None, **extra: Any) -> GatewaySettings:
    return settings_from_dict({"models": MODELS, **extra}, env=env or {})


def test_unset_limits_are_counted_in_the_gateways_memory() -> None:
    assert load().limits_store is None


def test_a_plain_url_or_a_mapping() -> None:
    plain = load(limits_store="redis://redis:6379/0").limits_store
    assert plain is not None and plain.url == "redis://redis:6379/0"
    assert plain.on_error == "fail_open" and plain.timeout == 0.25
    mapped = load(limits_store={"url": "rediss://r:6380/1", "on_error": "fail_closed"})
    assert mapped.limits_store is not None and mapped.limits_store.on_error == "fail_closed"


def test_the_environment_gives_the_url_and_the_file_the_rest() -> None:
    env = {"VLLM_GATEWAY_LIMITS_STORE": "redis://vllm-gateway-redis:6379/0"}
    store = load(env, limits_store={"on_error": "fail_closed"}).limits_store
    assert store is not None
    assert (store.url, store.on_error) == ("redis://vllm-gateway-redis:6379/0", "fail_closed")
    assert load(env).limits_store is not None  # no section in the file: the URL alone
    over = load(env, limits_store="redis://elsewhere:6379/0").limits_store
    assert over is not None and over.url == "redis://vllm-gateway-redis:6379/0"


def test_the_password_comes_from_the_environment_and_is_never_dumped() -> None:
    env = {"VLLM_GATEWAY_REDIS_PASSWORD": "hunter2"}
    store = load(env, limits_store="redis://r:6379/0").limits_store
    assert store is not None and store.password is not None
    assert store.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(store) and "hunter2" not in str(store.model_dump())
    named = load({"REDIS_PW": "x"}, limits_store={"url": "redis://r/0", "password_env": "REDIS_PW"})
    assert named.limits_store is not None and named.limits_store.password is not None


@pytest.mark.parametrize(
    ("store", "problem"),
    [
        ("redis://:hunter2@r:6379/0", "limits_store.url: no password in the URL"),
        ("http://r:6379", "limits_store.url: a Redis URL"),
        ("redis://r:port/0", "limits_store.url: not a URL"),
        ({"url": "redis://r/0", "on_error": "ignore"}, "limits_store.on_error"),
        ({"url": "redis://r/0", "timout": 1}, "limits_store.timout: unknown option"),
    ],
)
def test_a_bad_store_is_refused_naming_its_field(store: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(limits_store=store)
    assert any(line.startswith(problem) for line in refused.value.problems), refused.value


def test_a_reload_that_changes_the_store_is_refused_and_a_keys_limits_apply_in_place() -> None:
    keys = [{"name": "k", "key": "sk-k", "requests_per_minute": 60}]
    old = load(limits_store="redis://r:6379/0", api_keys=keys)
    moved = load(limits_store="redis://other:6379/0", api_keys=keys)
    assert any(line.startswith("limits_store:") for line in plan_reload(old, moved, 0).refused)
    rotated = load({"VLLM_GATEWAY_REDIS_PASSWORD": "new"}, limits_store="redis://r:6379/0")
    assert plan_reload(old, rotated.model_copy(update={"api_keys": old.api_keys}), 0).refused
    faster = [{**keys[0], "requests_per_minute": 600, "max_concurrent": 4}]
    same_store = load(limits_store="redis://r:6379/0", api_keys=faster)
    assert plan_reload(old, same_store, 0).refused == []
