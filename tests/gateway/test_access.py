"""Tenants see only their own models: who may read the ops surfaces, and what a model-limited
key can learn about models outside its list (nothing). In-process, through ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.config_file import ConfigError, settings_from_dict
from tests.servers import FakeBackend

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

KEYS = [
    {"name": "ops", "key": "sk-admin", "admin": True},
    {"name": "prometheus", "key": "sk-monitor", "monitor": True},
    {"name": "everyone", "key": "sk-all"},
    {"name": "embed-only", "key": "sk-embed", "models": ["tiny-embed"]},
]
CALLERS = {"admin": "sk-admin", "monitor": "sk-monitor", "unrestricted": "sk-all"}
CALLERS |= {"limited": "sk-embed", "no key": ""}
# The ops surfaces, each with what admin and monitor keys get there; nobody else reads them.
SURFACES = {
    "/metrics": 200,
    "/status.json": 200,
    "/backends/tiny-chat/metrics": 200,  # the fake backend's own, relayed
    "/backends/nothing/metrics": 404,  # past the access check: no such model
}


def client_for(settings: dict[str, Any], backend: FakeBackend) -> httpx.AsyncClient:
    models = [
        {"name": "tiny-chat", "aliases": ["chat"], "url": backend.url},
        {"name": "tiny-embed", "url": backend.url},
    ]
    app = create_app(settings_from_dict({"models": models, **settings}, env={}))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.fixture
async def gateway(fake: FakeBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for({"api_keys": KEYS}, fake) as client:
        yield client


def auth(caller: str) -> dict[str, str]:
    key = CALLERS[caller]
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.parametrize(("path", "served"), SURFACES.items())
async def test_only_admin_and_monitor_keys_read_the_ops_surfaces(
    gateway: httpx.AsyncClient, path: str, served: int
) -> None:
    statuses = {c: (await gateway.get(path, headers=auth(c))).status_code for c in CALLERS}
    refused = {"unrestricted": 403, "limited": 403, "no key": 401}
    assert statuses == {"admin": served, "monitor": served, **refused}
    forbidden = await gateway.get(path, headers=auth("limited"))
    assert forbidden.json()["error"]["type"] == "permission_error"
    assert "tiny-chat" not in forbidden.text and "embed-only" not in forbidden.text


async def test_admin_paths_answer_admin_keys_only(gateway: httpx.AsyncClient) -> None:
    statuses = {
        c: (await gateway.get("/admin/models", headers=auth(c))).status_code for c in CALLERS
    }
    assert statuses == {
        "admin": 200,
        "monitor": 403,
        "unrestricted": 403,
        "limited": 403,
        "no key": 401,
    }


async def test_an_opened_surface_needs_no_key_but_admin_paths_never_open(
    fake: FakeBackend,
) -> None:
    opened = {"api_keys": KEYS, "open_endpoints": ["metrics", "status", "backend_metrics"]}
    async with client_for(opened, fake) as gateway:
        for path in ["/metrics", "/status.json", "/backends/tiny-chat/metrics"]:
            assert (await gateway.get(path)).status_code == 200, path
        assert (await gateway.get("/admin/models")).status_code == 401
    async with client_for({}, fake) as keyless:  # no keys at all: open, except /admin
        assert (await keyless.get("/metrics")).status_code == 200
        assert (await keyless.get("/admin/models")).status_code == 403


async def test_a_model_outside_the_list_is_answered_as_one_that_does_not_exist(
    gateway: httpx.AsyncClient, fake: FakeBackend
) -> None:
    """The same status and the same body, for the model list, a model card and a request."""
    limited = auth("limited")
    for other, absent in [("tiny-chat", "no-such-model"), ("chat", "chut")]:
        hidden = await gateway.get(f"/v1/models/{other}", headers=limited)
        missing = await gateway.get(f"/v1/models/{absent}", headers=limited)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json() == _named(missing.json(), absent, other)
        body = {"messages": [{"role": "user", "content": "hi"}]}
        hidden = await gateway.post(
            "/v1/chat/completions", json={**body, "model": other}, headers=limited
        )
        missing = await gateway.post(
            "/v1/chat/completions", json={**body, "model": absent}, headers=limited
        )
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json() == _named(missing.json(), absent, other)
        assert "tiny-chat" not in missing.text.replace(absent, "")
    assert fake.stats()["started"] == 0  # no backend was asked
    traced = await gateway.get("/v1/models/nope", headers={**limited, "x-request-id": "trace-1"})
    assert traced.headers["x-request-id"] == "trace-1"  # control API errors carry it too
    listing = (await gateway.get("/v1/models", headers=limited)).json()
    assert [m["id"] for m in listing["data"]] == ["tiny-embed"]
    card = (await gateway.get("/v1/models/tiny-embed", headers=limited)).json()
    assert card["id"] == "tiny-embed" and card["object"] == "model"
    assert (await gateway.get("/v1/models/chat", headers=auth("unrestricted"))).json()["root"] == (
        "tiny-chat"
    )


def _named(error: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """The error of one name, as it would read for another."""
    message = error["error"]["message"].replace(repr(old), repr(new))
    return {"error": {**error["error"], "message": message}}


def test_admin_keys_call_every_model_and_names_are_unique() -> None:
    base: dict[str, Any] = {"models": [{"name": "m", "url": "http://127.0.0.1:9"}]}
    with pytest.raises(ConfigError) as limited_admin:
        settings_from_dict(
            {**base, "api_keys": [{"name": "a", "key": "k", "admin": True, "models": ["m"]}]},
            env={},
        )
    assert limited_admin.value.problems == [
        "api_keys[0]: an admin key sees every model: leave out `models`"
    ]
    with pytest.raises(ConfigError) as twice:
        settings_from_dict(
            {**base, "api_keys": [{"name": "env-1", "key": "k1"}]},
            env={"VLLM_GATEWAY_API_KEYS": "k2"},
        )
    assert twice.value.problems == ["api_keys.env-1: the name is used twice"]
    monitors = settings_from_dict(base, env={"VLLM_GATEWAY_MONITOR_KEYS": "sk-prom"})
    (monitor,) = monitors.api_keys
    assert monitor.name == "monitor-1" and monitor.monitor and not monitor.admin
