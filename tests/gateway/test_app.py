"""The app factory's outermost layer: it routes relayed paths, and it owns the lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest

from gateway.dispatch import Dispatcher


async def run_lifespan(dispatcher: Dispatcher) -> list[dict[str, Any]]:
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with suppress(RuntimeError):
        await dispatcher({"type": "lifespan"}, receive, send)
    return sent


async def test_startup_and_shutdown_run_around_the_served_time() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        events.append("started")
        yield
        events.append("stopped")

    sent = await run_lifespan(Dispatcher(None, None, lifespan))  # type: ignore[arg-type]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert events == ["started", "stopped"]


@pytest.mark.parametrize("fails_at", ["startup", "shutdown"])
async def test_a_failing_start_or_stop_is_reported_to_the_server(fails_at: str) -> None:
    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        if fails_at == "startup":
            raise RuntimeError("keys file unreadable")
        yield
        raise RuntimeError("a backend would not stop")

    sent = await run_lifespan(Dispatcher(None, None, lifespan))  # type: ignore[arg-type]
    assert sent[-1]["type"] == f"lifespan.{fails_at}.failed"
    assert "RuntimeError" in sent[-1]["message"]
