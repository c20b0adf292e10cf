"""What may interrupt a relay from outside: the client leaving, or a backend silent too long.

uvicorn silently drops what is sent to a client that has gone, so nothing would ever stop a
relay whose client left; a task watching `receive` for `http.disconnect` is what notices.
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.types import Message, Receive


class Reason:
    CLIENT_GONE = "client_gone"
    IDLE = "idle"


class Interrupter:
    """Cancels the relay task when the client disconnects or the backend stays silent.

    The timer is lazy: each chunk only records the time, and the timer, when it fires, re-arms
    itself at the last chunk's deadline. A stream pays one clock read per chunk, not a timer.
    """

    def __init__(self, task: asyncio.Task[Any], receive: Receive) -> None:
        self.reason: str | None = None
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._limit = 0.0
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Task[None] | None = self._loop.create_task(self._watch(receive))

    def arm(self, seconds: float) -> None:
        self._limit = seconds
        self._last = self._loop.time()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(self._last + seconds, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def _check(self) -> None:
        deadline = self._last + self._limit
        if self._loop.time() >= deadline:
            self._timer = None
            self._interrupt(Reason.IDLE)
        else:
            self._timer = self._loop.call_at(deadline, self._check)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._interrupt(Reason.CLIENT_GONE)
                return

    def _interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._task.cancel()
