"""A client that leaves stops the generation on the real vLLM server behind the gateway."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import httpx
import pytest

from tests.integration.conftest import KEY
from tests.servers import GatewayProcess, wait_until

pytestmark = [
    pytest.mark.vllm,
    # Opt-in for now: in some full-suite runs the request completed on vLLM without this test
    # ever seeing vllm:num_requests_running >= 1, and earlier versions failed in other ways; in
    # isolation and in other full runs it passes, and it fails as it should when the relay's
    # disconnect watcher is disabled. The gateway's side is covered in CI by the loopback tests
    # (tests/gateway/test_relay.py, mutation-checked). Not understood yet: see issue 2's note.
    pytest.mark.skipif(
        not os.environ.get("VLLM_GATEWAY_TEST_ABORT"),
        reason="opt-in (VLLM_GATEWAY_TEST_ABORT=1) until its flake is understood",
    ),
]
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
    running = lambda: metric(backend, "vllm:num_requests_running") >= 1  # noqa: E731
    if stream:  # a client that reads the events, then hangs up
        with httpx.stream(
            "POST",
            f"{gateway.url}/v1/chat/completions",
            content=body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        ) as response:
            assert next(response.iter_lines()).startswith("data: ")
            wait_until(running, 120, "generation")
    else:  # nothing arrives before the end, so a raw socket that never reads is a fair client
        client = socket.create_connection(("127.0.0.1", gateway.port))
        client.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body)
        )
        wait_until(running, 120, "generation")
        client.close()
    wait_until(lambda: metric(backend, "vllm:num_requests_running") == 0, 30, "the abort")
    time.sleep(0.5)  # the engine publishes its counters a moment later
    generated = metric(backend, "vllm:generation_tokens_total") - before
    assert generated < N * MAX_TOKENS / 2, f"{generated} tokens generated after the client left"
