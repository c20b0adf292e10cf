"""One structured line per request: the fields ops filter on, and never a body or a key."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.helpers import wait_until
from tests.servers import FakeBackend, GatewayProcess

pytestmark = pytest.mark.servers  # starts processes or servers on loopback


def test_json_access_log_has_one_line_per_request(tmp_path: Path, fake: FakeBackend) -> None:
    config = {
        "models": [{"name": fake.name, "url": fake.url}],
        "api_keys": [{"name": "team-a", "key": "sk-secret-team-a"}],
        "log_format": "json",
    }
    gateway = GatewayProcess(config, tmp_path)
    try:
        headers = {"Authorization": "Bearer sk-secret-team-a", "X-Request-Id": "req-42"}
        request = {"model": fake.name, "messages": [{"role": "user", "content": "PRIVATE-TEXT"}]}
        assert httpx.post(f"{gateway.url}/v1/chat/completions", json=request, headers=headers)
        guess = {"Authorization": "Bearer sk-guess", "X-Request-Id": "req-43"}
        response = httpx.post(f"{gateway.url}/v1/chat/completions", json=request, headers=guess)
        assert response.status_code == 401 and response.headers["x-request-id"] == "req-43"
        wait_until(lambda: "req-42" in gateway.log.read_text(), 5, "the access line")
    finally:
        gateway.close()
    text = gateway.log.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    (access,) = [line for line in lines if line.get("request_id") == "req-42"]
    assert access["logger"] == "vllm_gateway.access"
    assert {k: access[k] for k in ("key", "model", "endpoint", "status", "backend")} == {
        "key": "team-a",
        "model": fake.name,
        "endpoint": "/v1/chat/completions",
        "status": 200,
        "backend": fake.url,
    }
    assert access["latency_ms"] > 0 and access["ttfb_ms"] > 0
    assert (access["prompt_tokens"], access["completion_tokens"]) == (8, 8)
    refused = [line for line in lines if line.get("request_id") == "req-43"]
    assert [(r["status"], r["key"], r["endpoint"]) for r in refused] == [
        (401, "-", "/v1/chat/completions")
    ]
    assert "sk-secret-team-a" not in text and "PRIVATE-TEXT" not in text
    assert "sk-guess" not in text
    assert all(line.startswith("{") for line in text.splitlines() if line.strip())


def test_text_access_line_and_switching_it_off(tmp_path: Path, fake: FakeBackend) -> None:
    request = {"model": fake.name, "messages": [{"role": "user", "content": "hi"}]}
    logged = GatewayProcess({"models": [{"name": fake.name, "url": fake.url}]}, tmp_path / "on")
    silent = GatewayProcess(
        {"models": [{"name": fake.name, "url": fake.url}], "access_log": False}, tmp_path / "off"
    )
    try:
        for gateway in (logged, silent):
            headers = {"X-Request-Id": f"req-{gateway.port}"}
            response = httpx.post(
                f"{gateway.url}/v1/chat/completions", json=request, headers=headers
            )
            assert response.status_code == 200
        wait_until(lambda: f"req-{logged.port}" in logged.log.read_text(), 5, "the access line")
    finally:
        logged.close()
        silent.close()  # a clean stop flushes whatever the access log still holds
    (line,) = [ln for ln in logged.log.read_text().splitlines() if f"req-{logged.port}" in ln]
    assert " INFO vllm_gateway.access: endpoint=/v1/chat/completions status=200 " in line
    assert f"model={fake.name} key=- backend={fake.url} " in line
    assert "prompt_tokens=8 completion_tokens=8" in line
    assert "vllm_gateway.access" not in silent.log.read_text()
