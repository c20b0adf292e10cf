"""Small things many tests share: headers, waiting on a condition, fast supervisor timings."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest

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


class Output:
    """What a test's process writes to stderr, gathered as it comes (``capfd``), so a test
    waits for a line instead of for the access log's next flush."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.text = ""

    def has(self, *needles: str) -> bool:
        self.text += self.capfd.readouterr().err
        return all(needle in self.text for needle in needles)

    def wait_for(self, *needles: str, timeout: float = 10) -> str:
        wait_until(lambda: self.has(*needles), timeout, f"{needles} on stderr")
        return self.text


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


class StreamReader:
    """Reads one streamed request's lines in a thread, as they come; ``started`` is set at the
    first one, ``join`` waits for the end."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        self.lines: list[str] = []
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(url, body, headers))
        self._thread.start()
        assert self.started.wait(20), "no line of the stream within 20 s"

    def _read(self, url: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as response:
            for line in response.iter_lines():
                self.started.set()
                self.lines.append(line)

    def join(self, timeout: float = 30) -> list[str]:
        self._thread.join(timeout)
        return self.lines
