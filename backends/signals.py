"""A signal a task can wait on until something it watches may have changed.

Cheaper than a condition for the hot path: firing one nobody waits on is a single check, so a
request's lease can fire its replica's on every release.
"""

from __future__ import annotations

import asyncio


class Signal:
    """Wakes every waiter at the moment it fires; a waiter then looks again at what it watches
    (the signal carries no value, so nothing it says can be stale)."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def fire(self) -> None:
        event, self._event = self._event, None
        if event is not None:
            event.set()

    async def wait(self) -> None:
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()
