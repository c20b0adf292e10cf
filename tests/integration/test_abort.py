"""A client that leaves stops the generation on the real vLLM server behind the gateway."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest

from tests.integration.conftest import KEY
from tests.servers import GatewayProcess, wait_until

pytestmark = pytest.mark.vllm
# With ignore_eos a finished request generates exactly N x MAX_TOKENS tokens (~5 s here).
N, MAX_TOKENS = 16, 900


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_stops_generation(
    gateway: GatewayProcess, vllm: dict[str, str], stream: bool
) -> None:
    """The client hangs up once vLLM is generating; vLLM must stop well short of the end."""
    backend = vllm["tiny-chat"]
    wait_until(lambda: metric(backend, "vllm:num_requests_running") == 0, 60, "an idle backend")
    before = metric(backend, "vllm:generation_tokens_total")
    body = json.dumps(
        {
            "model": "tiny-chat",
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": MAX_TOKENS,
            "n": N,
            "ignore_eos": True,
            "stream": stream,
        }
    ).encode()
    client = socket.create_connection(("127.0.0.1", gateway.port))
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s"
        % (KEY.encode(), len(body), body)
    )
    wait_until(lambda: metric(backend, "vllm:num_requests_running") >= 1, 120, "generation")
    client.close()
    wait_until(lambda: metric(backend, "vllm:num_requests_running") == 0, 30, "the abort")
    time.sleep(0.5)  # the engine publishes its counters a moment later
    generated = metric(backend, "vllm:generation_tokens_total") - before
    assert generated < N * MAX_TOKENS / 2, f"{generated} tokens generated after the client left"
