"""The gateway's own calls to a backend keep their client's connect timeout (the config's
`timeouts.connect`), even where a call sets a longer timeout of its own."""

from __future__ import annotations

from pathlib import Path

import httpx

from backends import adapters, sleep_mode
from backends.pool import Replica
from backends.spec import VllmSpec
from backends.supervisor import Supervisor


def recording_client(seen: list[dict[str, float]], body: bytes) -> httpx.AsyncClient:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, content=body)

    return httpx.AsyncClient(
        transport=httpx.MockTransport(answer), timeout=httpx.Timeout(5.0, connect=1.5)
    )


async def test_sleep_and_wake_calls_keep_the_connect_timeout() -> None:
    seen: list[dict[str, float]] = []
    async with recording_client(seen, b'{"is_sleeping": true}') as client:
        await sleep_mode.put_to_sleep(client, "http://backend", 2, timeout=300.0)
    assert [t["connect"] for t in seen] == [1.5, 1.5]  # /sleep, then /is_sleeping
    assert seen[0]["read"] == 300.0  # the call's own limit for the rest


async def test_adapter_calls_keep_the_connect_timeout() -> None:
    seen: list[dict[str, float]] = []
    async with recording_client(seen, b"ok") as client:
        await adapters.load(client, Replica(url="http://backend"), "sql", "/models/lora/sql")
    assert seen[0]["connect"] == 1.5 and seen[0]["read"] == adapters.CALL_TIMEOUT


def test_the_supervisor_gives_each_server_the_connect_timeout(tmp_path: Path) -> None:
    spec = VllmSpec(name="m", model="/models/m", launcher=("vllm", "serve"))
    supervisor = Supervisor([spec], log_dir=tmp_path, connect_timeout=1.5)
    assert supervisor.backends["m"].client.timeout.connect == 1.5
