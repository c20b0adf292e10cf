"""A client that leaves while a second request of its connection waits behind the first stops
the generation on a real vLLM server at once (one tiny chat server of this module's own).

Before, the gateway told only the newest request of a connection that its client had gone:
the one queued, never the one generating, which ran to its end."""

from __future__ import annotations

import json
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backends.process import free_port
from tests.helpers import wait_until
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS, BACKENDS, _launch, _serves, spec_for

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # real servers of its own, after the rig
MAX_TOKENS = 1000  # ignore_eos: a request that is not aborted generates all of them


@pytest.fixture(scope="module")
def backend(rig_stopped: None) -> Iterator[str]:
    kind, args = BACKENDS["tiny-chat"]
    spec = spec_for("tiny-chat", kind, {**args, "max-model-len": 2048}, core=1)
    port = free_port()
    log = ARTIFACTS / "vllm-disconnects.log"
    ARTIFACTS.mkdir(exist_ok=True)
    proc = _launch(spec.command(port), log, dict(spec.env))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _serves(url, "tiny-chat"), 280, "the tiny chat server", every=1)
        yield url
    finally:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def gateway(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = {"models": [{"name": "tiny-chat", "url": backend}]}
    server = GatewayProcess(config, Path(tmp_path_factory.mktemp("gateway")))
    yield server
    server.close()


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


def busy(url: str) -> float:
    return metric(url, "vllm:num_requests_running") + metric(url, "vllm:num_requests_waiting")


@pytest.mark.parametrize("leaving", ["close", "reset"])
def test_a_client_leaving_with_a_request_queued_stops_the_generation(
    gateway: GatewayProcess, backend: str, leaving: str
) -> None:
    wait_until(lambda: busy(backend) == 0, 120, "an idle backend")
    before = metric(backend, "vllm:generation_tokens_total")
    doc = {
        "model": "tiny-chat",
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
    }
    body = json.dumps(doc).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s"
    )
    client = socket.create_connection(("127.0.0.1", gateway.port))
    client.sendall(request % (len(body), body) * 2)  # the second waits for the first's answer
    generating = lambda: metric(backend, "vllm:generation_tokens_total") > before  # noqa: E731
    wait_until(generating, 120, "generation", every=0.1)
    if leaving == "reset":
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    # Not aborted, the request runs on for minutes (a few tokens a second on a busy CPU).
    wait_until(lambda: busy(backend) == 0, 60, "the abort", every=0.1)
    generated = metric(backend, "vllm:generation_tokens_total") - before
    assert generated < MAX_TOKENS / 2, f"{generated:.0f} of {MAX_TOKENS} tokens"
