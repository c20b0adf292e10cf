"""The status page: /status.json for scripts, and /status as a person sees it in Chromium."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import httpx
import pytest

from backends.supervisor import Supervisor
from gateway.specs import backend_specs
from tests.helpers import FAST_SPAWN
from tests.servers import FAKE_VLLM, ROOT, FakeBackend, GatewayServer, gateway_settings

pytestmark = pytest.mark.servers  # starts processes or servers on loopback

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts"))


def test_status_json_describes_every_replica(fake: FakeBackend) -> None:
    models = [{"name": fake.name, "aliases": ["chat"], "url": fake.url}]
    gateway = GatewayServer(
        gateway_settings(models, api_keys=[{"name": "ops", "key": "sk-a", "admin": True}])
    )
    try:
        headers = {"Authorization": "Bearer sk-a"}
        request = {"model": "chat", "messages": []}
        httpx.post(f"{gateway.url}/v1/chat/completions", json=request, headers=headers)
        doc = httpx.get(f"{gateway.url}/status.json", headers=headers).json()
    finally:
        gateway.close()
    (model,) = doc["models"]
    assert (model["name"], model["aliases"], model["mode"], model["ready"]) == (
        "fake-chat",
        ["chat"],
        "connect",
        1,
    )
    assert model["recent"]["requests"] == 1 and model["recent"]["tokens_per_s"] > 0
    (replica,) = model["replicas"]
    assert replica["state"] == "ready" and replica["url"] == fake.url
    assert doc["gateway"]["uptime_s"] >= 0


@pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")
def test_status_page_in_a_real_browser(tmp_path: Path) -> None:
    """Two spawned backends come up while the page watches; it asks for a key first, and for
    another one when the first may not read the status. The chat model shows its KV cache:
    1 GiB expected (VLLM_CPU_KVCACHE_SPACE), 4,096 x 16 tokens of 2 KiB reported."""
    from playwright.sync_api import sync_playwright

    (tmp_path / "chat").mkdir()
    (tmp_path / "chat" / "config.json").write_text(
        '{"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128}'
    )
    spawn = {"model": "fake", "gpus": [], "args": {"startup-delay": 1.0}}
    chat = {
        "model": str(tmp_path / "chat"),
        "args": {"startup-delay": 1.0, "num-gpu-blocks": 4096, "dtype": "float32"},
        "env": {"VLLM_CPU_KVCACHE_SPACE": "1"},
    }
    settings = gateway_settings(
        [
            {"name": "tiny-chat", "aliases": ["chat"], "vllm": chat},
            {"name": "tiny-embed", "vllm": spawn},
        ],
        api_keys=["sk-team", {"name": "dashboard", "key": "sk-page", "monitor": True}],
        launcher=[sys.executable, FAKE_VLLM],
        log_dir=str(tmp_path),
    )
    supervisor = Supervisor(backend_specs(settings), log_dir=tmp_path, timings=FAST_SPAWN)
    gateway = GatewayServer(settings, supervisor=supervisor)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 400})
            page.goto(f"{gateway.url}/status")
            page.fill("#key", "sk-team")
            page.click("#keyform button")
            page.wait_for_selector("#error:has-text('monitor or admin key')", timeout=10_000)
            page.fill("#key", "sk-page")
            page.click("#keyform button")
            page.wait_for_selector(
                "tr[data-model='tiny-embed'][data-state='ready']", timeout=20_000
            )
            page.wait_for_selector("tr[data-model='tiny-chat'][data-state='ready']", timeout=20_000)
            page.wait_for_selector("tr[data-model='tiny-chat'] td.short", timeout=10_000)
            rows = page.locator("#rows tr").all_inner_texts()
            kv_class = page.locator("tr[data-model='tiny-chat'] td").nth(9).get_attribute("class")
            page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
            browser.close()
    finally:
        gateway.close()
    assert len(rows) == 2
    cells = [[c.strip() for c in row.split("\t")] for row in rows]
    assert cells[0][:3] == ["tiny-chat\nchat", "0", "ready"]  # the alias under the name
    assert cells[1][:3] == ["tiny-embed", "0", "ready"]
    assert all("http://127.0.0.1:" in row for row in rows)
    assert cells[0][9] == "0.1 of 1.0 GiB (65,536 tok)" and "short" in kv_class
    assert cells[1][9] == "\u2013"  # an en dash: a pooling model keeps no KV cache
