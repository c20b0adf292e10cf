"""CORS: off unless configured; when on, preflights are answered without a key."""

from __future__ import annotations

import httpx
import pytest

from tests.servers import FakeBackend, running_gateway

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_no_cors_headers_unless_configured(fake: FakeBackend) -> None:
    with running_gateway([{"name": fake.name, "url": fake.url}]) as gateway:
        response = httpx.get(f"{gateway.url}/v1/models", headers={"Origin": "https://app.example"})
        assert response.status_code == 200
        assert not [h for h in response.headers if h.startswith("access-control-")]


def test_preflight_is_answered_without_a_key_and_requests_still_need_one(
    fake: FakeBackend,
) -> None:
    cors = {"allowed_origins": ["https://app.example"], "allow_credentials": True}
    models = [{"name": fake.name, "url": fake.url}]
    with running_gateway(models, api_keys=["sk-a"], cors=cors) as gateway:
        url = f"{gateway.url}/v1/chat/completions"
        preflight = httpx.options(url, headers=PREFLIGHT)
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        other = httpx.options(url, headers={**PREFLIGHT, "Origin": "https://evil.example"})
        assert other.status_code == 400
        unauthorized = httpx.post(
            url, json={"model": fake.name}, headers={"Origin": PREFLIGHT["Origin"]}
        )
        assert unauthorized.status_code == 401
        assert unauthorized.headers["access-control-allow-origin"] == "https://app.example"
