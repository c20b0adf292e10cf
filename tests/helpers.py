"""Small things many tests share: headers, waiting on a condition, fast supervisor timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from backends.supervisor import SpawnHealth, SupervisorTimings

# Spawn mode against the fake vLLM: every wait short, so a restart takes a blink.
FAST_SPAWN = SupervisorTimings(
    poll_interval=0.05, health=SpawnHealth(interval=0.2), backoff_base=0.1, stop_grace=2
)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll a condition with a deadline: tests wait on conditions, never on fixed sleeps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def until(condition: Callable[[], bool], timeout: float = 10, what: str = "it") -> None:
    """``wait_until`` for tests that run on the event loop."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


class Dns:
    """A resolver for `discover` whose answer the test sets: addresses, or an error."""

    def __init__(self, *ips: str) -> None:
        self.answer: Sequence[str] | OSError = ips
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append((host, port))
        if isinstance(self.answer, OSError):
            raise self.answer
        return self.answer
