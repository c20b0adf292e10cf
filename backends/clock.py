"""The clock the on-demand models and their swaps run on: the running event loop's.

In the gateway that is asyncio's own loop, whose ``time()`` is ``time.monotonic()``. The swap
replay (``load/swaps.py``) and the scheduler's tests run the same code on a
``VirtualTimeLoop``: a loop with no I/O whose clock jumps to the next timer whenever no task
can run, so a day of traffic replays in seconds and a test's timeouts are exact. Everything
the backends time (``asyncio.sleep``, ``asyncio.timeout``, ``now()``) then follows it; that is
the clock's injection point, with no clock object to hand down.
"""

from __future__ import annotations

import asyncio
import time
from asyncio import base_events
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def now() -> float:
    """The running loop's time (``time.monotonic()`` outside a loop)."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class Stalled(RuntimeError):
    """Every task waits and no timer is set: on a real loop this would hang for ever."""


TURN = 1e-6  # seconds each turn of a virtual loop takes


class _Jump:
    """The selector of a loop without I/O: waiting ``timeout`` seconds is moving the clock.
    Every turn moves it by ``TURN`` at least, as a real clock moves while code runs: code
    that sleeps until a time it computed then finds the clock past it, not a rounding short
    of it for ever."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self.loop = loop

    def select(self, timeout: float | None) -> list[Any]:
        if timeout is None:
            raise Stalled("virtual time: every task waits and no timer is set")
        self.loop.advance(max(timeout, TURN))
        return []

    def close(self) -> None:
        pass


class VirtualTimeLoop(base_events.BaseEventLoop):
    """An event loop whose clock only moves when nothing is ready to run: then it jumps to
    the next timer. For code that talks to no socket, process or thread."""

    def __init__(self, start: float = 0.0) -> None:
        super().__init__()
        self._virtual_now = start
        self._selector = _Jump(self)

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += max(0.0, seconds)

    def _process_events(self, event_list: list[Any]) -> None:
        pass

    def _write_to_self(self) -> None:
        pass  # a wake-up from another thread: there is none to wait for


def run_virtual(main: Coroutine[Any, Any, T], start: float = 0.0) -> T:
    """``asyncio.run`` on a ``VirtualTimeLoop``, without making it the thread's loop."""
    loop = VirtualTimeLoop(start)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()
