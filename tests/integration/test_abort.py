"""A client that leaves stops the generation on the real vLLM server behind the gateway."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from tests.integration.conftest import KEY
from tests.servers import GatewayServer, wait_until

pytestmark = pytest.mark.vllm
# With ignore_eos a finished request generates exactly N x MAX_TOKENS tokens: far more than a
# loaded 2-core machine can produce before the client's short timeout (seen: 900 tokens alone
# can finish inside it, and then there is nothing left to abort).
N, MAX_TOKENS = 16, 900


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_stops_generation(
    gateway: GatewayServer,
    vllm: dict[str, str],
    stream: bool,
) -> None:
    backend = vllm["tiny-chat"]
    before = metric(backend, "vllm:generation_tokens_total")
    body = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    if stream:
        with httpx.stream(
            "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{gateway.url}/v1/chat/completions",
                json=body,
                headers=headers,
                timeout=httpx.Timeout(10, read=0.3),
            )
    wait_until(lambda: metric(backend, "vllm:num_requests_running") == 0, 30, "the abort")
    time.sleep(0.5)  # metrics are published by the engine a moment later
    generated = metric(backend, "vllm:generation_tokens_total") - before
    assert generated < N * MAX_TOKENS / 2, f"{generated} tokens generated after the client left"
