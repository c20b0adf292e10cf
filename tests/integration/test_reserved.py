"""Slots kept for interactive requests (`queue.reserved`), against a real vLLM server: one
spawned tiny chat server running two sequences at once, behind a gateway whose queue takes 2
at a time and keeps 1 for interactive requests. A batch key's second request waits in the
gateway although vLLM has room for it, and an interactive request sent after it goes to vLLM
at once: it is answered while the first batch request still runs, before the second.

The queue's order, in-process: tests/backends/test_queues.py; measured: load/fairness.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration import spawned
from tests.integration.spawned import tiny_chat
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # a server of its own, after the rig

MODEL = "r-chat"
READY = 300.0
KEYS = {"ops": "sk-ops", "nightly": "sk-nightly", "ui": "sk-ui"}
LONG = 1800  # tokens: the first batch request runs while the rest of the test happens


def config() -> dict[str, object]:
    chat = tiny_chat(MODEL, core=1, max_len=2048)
    chat["vllm"]["args"]["max-num-seqs"] = 2  # type: ignore[index]
    chat["queue"] = {"max_in_flight": 2, "reserved": {"interactive": 1}}
    return {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "reserved"),
        "api_keys": [
            {"name": "ops", "key": KEYS["ops"], "admin": True},
            {"name": "nightly", "key": KEYS["nightly"], "priority": "batch"},
            {"name": "ui", "key": KEYS["ui"], "priority": "interactive"},
        ],
        "models": [chat],
    }


def chat(gw: GatewayProcess, key: str, tokens: int) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "max_tokens": tokens,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=300)


def gauge(gw: GatewayProcess, path: str, name: str) -> float:
    return spawned.gauge(gw, path, name, KEYS["ops"])


def sent_to_vllm(gw: GatewayProcess) -> float:
    """Requests the gateway relays to the server now. Not vLLM's own running gauge: the CPU
    server's engine runs in its API server's process, whose /metrics may answer only once the
    generation in progress ends."""
    return gauge(gw, "/metrics", "vllm_gateway_requests_in_flight")


def waiting_in_gateway(gw: GatewayProcess) -> float:
    return gauge(gw, "/metrics", "vllm_gateway_queue_length")


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    with spawned.serving(config(), lambda gw: chat(gw, "ui", 2), READY) as server:
        yield server


def test_an_interactive_request_takes_the_kept_slot_while_a_batch_one_waits(
    gw: GatewayProcess,
) -> None:
    finished: list[str] = []
    lock = threading.Lock()

    def send(label: str, key: str, tokens: int) -> None:
        answer = chat(gw, key, tokens)
        assert answer.status_code == 200, answer.text
        with lock:
            finished.append(label)

    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(send, "batch-1", "nightly", LONG)
        wait_until(lambda: sent_to_vllm(gw) == 1, 60, "batch-1 sent to vLLM")
        second = pool.submit(send, "batch-2", "nightly", 8)
        wait_until(lambda: waiting_in_gateway(gw) == 1, 60, "batch-2 waiting in the gateway")
        assert sent_to_vllm(gw) == 1  # vLLM runs two at once: the second slot is kept
        interactive = pool.submit(send, "interactive", "ui", 8)
        interactive.result(timeout=300)
        assert finished == ["interactive"], finished  # batch-1 still runs, batch-2 waits
        first.result(timeout=300)
        second.result(timeout=300)
    assert finished == ["interactive", "batch-1", "batch-2"]
