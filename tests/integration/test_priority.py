"""Priorities reach vLLM: one spawned tiny chat server running `--scheduling-policy priority`
(and one sequence at a time, so that its own queue shows), behind a gateway whose keys have
priorities. vLLM takes the body's `priority` the gateway writes, and serves by it: a request
of an interactive key, sent after batch ones that wait, is answered before them.

The gateway's own queue, in-process: tests/gateway/traffic/test_queueing.py; measured against
this model: load/fairness.py --vllm.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration import spawned
from tests.integration.spawned import tiny_chat
from tests.servers import GatewayProcess
from tests.vllm_rig import ARTIFACTS

pytestmark = [pytest.mark.vllm, pytest.mark.vllm_own]  # a server of its own, after the rig

MODEL = "p-chat"
READY = 300.0
KEYS = {"ops": "sk-ops", "nightly": "sk-nightly", "ui": "sk-ui"}
# Past the tiny model's 2,048 positions (RoPE has no table to run out of): a stream this long
# holds vLLM's one sequence for tens of seconds, not the two a 2,000-token answer took.
LONG = 16384


def config() -> dict[str, object]:
    chat = tiny_chat(MODEL, core=0, max_len=LONG)
    chat["vllm"]["args"].update({"scheduling-policy": "priority", "max-num-seqs": 1})  # type: ignore[index]
    chat["vllm"]["env"]["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # type: ignore[index]
    return {
        "launcher": ["python", "-m", "vllm.entrypoints.openai.api_server"],
        "log_dir": str(ARTIFACTS / "priority"),
        "api_keys": [
            {"name": "ops", "key": KEYS["ops"], "admin": True},
            {"name": "nightly", "key": KEYS["nightly"], "priority": "batch"},
            {"name": "ui", "key": KEYS["ui"], "priority": "interactive"},
        ],
        "models": [chat],
    }


def chat(gw: GatewayProcess, key: str, tokens: int = 4, **extra: object) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        **extra,
    }
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=300)


def vllm_gauge(gw: GatewayProcess, name: str) -> float:
    """One of the server's own gauges (`vllm:num_requests_running`, ...), relayed."""
    return spawned.gauge(gw, f"/backends/{MODEL}/metrics", name, KEYS["ops"])


@pytest.fixture(scope="module")
def gw(rig_stopped: None) -> Iterator[GatewayProcess]:
    with spawned.serving(config(), lambda gw: chat(gw, "ui"), READY) as server:
        yield server


def test_vllm_takes_the_priority_the_gateway_writes_into_the_body(gw: GatewayProcess) -> None:
    assert chat(gw, "ui").status_code == 200  # priority -10
    assert chat(gw, "nightly").status_code == 200  # priority 10
    answer = chat(gw, "nightly", priority=-999)  # the client's own field: replaced by the key's
    assert answer.status_code == 200, answer.text
    stepped_back = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {KEYS['ui']}", "x-vllm-gateway-priority": "batch"},
        timeout=120,
    )
    assert stepped_back.status_code == 200, stepped_back.text


def test_an_interactive_request_is_served_before_batch_requests_that_waited_longer(
    gw: GatewayProcess,
) -> None:
    for _ in range(ATTEMPTS):
        finished = _three_wait_behind_a_running_one(gw)
        if finished is not None:
            break
    else:
        pytest.fail(f"the running request ended before three waited, {ATTEMPTS} times")
    assert finished[0] == "interactive", finished  # fcfs would have served it last


ATTEMPTS = 3  # a tiny model writes its longest answer in seconds: a busy machine may outrun it


def _three_wait_behind_a_running_one(gw: GatewayProcess) -> list[str] | None:
    """A batch stream holds vLLM's one sequence; two batch requests, then an interactive one,
    wait behind it; the stream is then closed (vLLM aborts it) and the order in which the
    three finish is vLLM's choice. None when the stream ended before all three waited (the
    scenario did not happen; no order is read from it)."""
    finished: list[str] = []
    lock = threading.Lock()

    def send(label: str, key: str) -> None:
        answer = chat(gw, key, 8)
        assert answer.status_code == 200, answer.text
        with lock:
            finished.append(label)

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Count from one to a thousand."}],
        "max_tokens": LONG - 64,  # all the context holds
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEYS['nightly']}"}
    with (
        ThreadPoolExecutor(3) as pool,
        httpx.stream(
            "POST", f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=300
        ) as running,
    ):
        assert running.status_code == 200
        events = running.iter_lines()  # kept: a dropped iterator closes the stream
        next(events)  # its first event: vLLM runs it
        waiting: list[Future[None]] = []
        try:
            for label, key in (("batch-1", "nightly"), ("batch-2", "nightly"), ("ui", "ui")):
                waiting.append(pool.submit(send, "interactive" if key == "ui" else label, key))
                _until_waiting(gw, len(waiting))  # behind the running one, batch ones longest
        except TimeoutError:
            _drain(waiting)
            return None
        running.close()  # the client leaves: the gateway aborts it upstream
        for future in waiting:
            future.result(timeout=120)
    return finished


def _until_waiting(gw: GatewayProcess, n: int) -> None:
    def waiting() -> bool:
        return vllm_gauge(gw, "vllm:num_requests_waiting") == n

    wait_until(waiting, 30, f"{n} waiting in vLLM")


def _drain(futures: list[Future[None]]) -> None:
    for future in futures:
        future.result(timeout=120)
