"""Deadlines without a timer per request: one periodic sweep per event loop checks them all.

A timer per request (armed, re-armed, cancelled) costs more than the request's own routing;
the deadlines here are seconds to minutes long, so checking them a few times a second is
exact enough, and a request only pays a set insert and a clock read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Sweeper(Generic[T]):
    """Calls ``check(item, now)`` for every watched item, every ``interval`` seconds."""

    def __init__(self, check: Callable[[T, float], None], interval: float = 1.0) -> None:
        self.check = check
        self.interval = interval
        self._items: dict[asyncio.AbstractEventLoop, set[T]] = {}

    def add(self, item: T, loop: asyncio.AbstractEventLoop) -> None:
        items = self._items.get(loop)
        if items is None:
            items = self._items[loop] = set()
            loop.call_later(self.interval, self._sweep, loop)
        items.add(item)

    def discard(self, item: T, loop: asyncio.AbstractEventLoop) -> None:
        items = self._items.get(loop)
        if items is not None:
            items.discard(item)

    def at_most_every(self, seconds: float) -> None:
        """Sweep often enough for a deadline this short to fire at most a quarter late."""
        self.interval = min(self.interval, seconds / 4)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop.is_closed():
            self._items.pop(loop, None)
            return
        now = loop.time()
        for item in list(self._items[loop]):
            self.check(item, now)
        loop.call_later(self.interval, self._sweep, loop)
