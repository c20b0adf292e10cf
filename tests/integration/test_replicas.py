"""Two real vLLM replicas of one model under steady load; one is killed with SIGKILL mid-run.

The kill hits the server and the gateway's helper above it, as `pkill -9 -f <model>` does; the
engine core below them must not survive (the gateway ends the rest of the tree). Every request
that had not started streaming must succeed (the gateway retries it on the other replica), every
stream cut by the dying server must end with an error event and [DONE], the
dead replica must leave the pool at once and come back once the supervisor restarted it, with
the runtime LoRA adapter it held loaded again before it is admitted.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.helpers import wait_until
from tests.integration.outcomes import ACCEPTED, chat_outcome
from tests.integration.spawned import AUTH, chat, embed, vllm_servers
from tests.servers import alive, descendants, parent
from tests.vllm_rig import ARTIFACTS, LORA, READY_TIMEOUT, VllmRig

pytestmark = pytest.mark.vllm
CLIENTS, SECONDS, KILL_AT = 8, 30.0, 8.0
ADAPTER = "sc-runtime"


def replicas(url: str) -> list[dict[str, object]]:
    doc = httpx.get(f"{url}/status.json", headers=AUTH, timeout=10).json()
    (model,) = [m for m in doc["models"] if m["name"] == "spawned-chat"]
    return model["replicas"]  # type: ignore[no-any-return]


def one_request(url: str, stream: bool, model: str = "sc") -> str:
    # Long streams, so the kill cuts some mid-way.
    return chat_outcome(url, model, AUTH, stream, max_tokens=160 if stream else 16)


def test_killing_one_replica_under_load(rig: VllmRig) -> None:
    gw = rig.spawned["mixed"]
    wait_until(
        lambda: [r["state"] for r in replicas(gw.url)] == ["ready"] * 2,
        READY_TIMEOUT,
        "both replicas",
        every=1,
    )
    assert chat(gw, "sc").json()["model"] == "spawned-chat"  # the alias, answered as its model
    assert embed(gw, "tiny-embed").status_code == 200  # the connect-mode model of the config
    # A runtime LoRA adapter on both replicas: the restarted one must get it back before it
    # is admitted, so no request for it may fail (half the plain requests name it).
    loaded = httpx.post(
        f"{gw.url}/admin/models/spawned-chat/adapters",
        json={"name": ADAPTER, "path": str(LORA)},
        headers=AUTH,
        timeout=120,
    )
    assert loaded.status_code == 200, loaded.text
    servers = vllm_servers(gw)
    assert len(servers) == 2

    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + SECONDS

    def client(n: int) -> None:
        stream = n % 2 == 0
        model = ADAPTER if n % 4 == 1 else "sc"
        while time.monotonic() < stop_at:
            outcome = one_request(gw.url, stream, model)
            with lock:
                outcomes[outcome] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    for thread in threads:
        thread.start()
    time.sleep(KILL_AT)
    # What `pkill -9 -f <model>` hits: the server and the gateway's helper above it, not the
    # engine core below them, which would live on under init, holding its memory.
    victim = servers[0]
    helper = parent(victim)
    tree = [helper, *descendants(helper)]
    assert len(tree) >= 3  # helper, server, engine core
    for pid in (helper, victim):
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    # Out of rotation: its process seen gone (state), or ejected after refused connections.
    wait_until(
        lambda: any(r["state"] != "ready" or r["ejected"] for r in replicas(gw.url)),
        15,
        "the dead replica to leave the rotation",
    )
    ejected_after = time.monotonic() - killed
    wait_until(lambda: not any(alive(p) for p in tree), 30, "the whole killed tree to end")
    tree_gone_after = time.monotonic() - killed
    assert embed(gw, "tiny-embed").status_code == 200  # the other model keeps answering
    for thread in threads:
        thread.join()
    wait_until(
        lambda: [r["state"] for r in replicas(gw.url)] == ["ready"] * 2,
        READY_TIMEOUT,
        "the restarted replica to be admitted again",
        every=1,
    )
    restarted_after = time.monotonic() - killed
    assert [r["adapters"] for r in replicas(gw.url)] == [[ADAPTER]] * 2  # restored
    with ThreadPoolExecutor(8) as pool:  # under load, right after the restart
        after = Counter(pool.map(lambda _: one_request(gw.url, False, ADAPTER), range(24)))
    assert after == {"plain 200": 24}, after
    report = {
        "outcomes": dict(outcomes),
        "ejected_after_s": round(ejected_after, 2),
        "tree_gone_after_s": round(tree_gone_after, 2),
        "readmitted_after_s": round(restarted_after, 1),
        "restarts": [r["restarts"] for r in replicas(gw.url)],
    }
    (ARTIFACTS / "replicas-under-load.json").write_text(json.dumps(report, indent=2))
    print(report)
    assert set(outcomes) <= ACCEPTED, report
    assert outcomes["plain 200"] > 0 and outcomes["stream complete"] > 0
    assert sorted(report["restarts"]) == [0, 1]  # type: ignore[arg-type]
