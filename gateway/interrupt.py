"""What may interrupt a relay from outside: the client leaving, or a backend silent too long.

uvicorn silently drops what is sent to a client that has gone, so nothing would ever stop a
relay whose client left. The gateway's server protocol (``gateway.server``) reports it through
a scope extension; under any other ASGI server a task watching `receive` for
`http.disconnect` does. Deadlines are checked by a periodic sweep (``gateway.sweeper``): a
relay pays a clock read per chunk, and no timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from gateway.sweeper import Sweeper
from gateway.types import Message, Receive, Scope

CLIENT_GONE = "vllm_gateway.client_gone"  # the scope["extensions"] key of a ClientGone


class ClientGone:
    """The server's half: it calls ``notify`` when the client leaves before the response ends,
    and ``closing`` when the server begins to shut down with the request still open.

    A departure is remembered: a callback set after it (the relay had not got that far when
    the connection went) is called at once, so no departure is ever lost."""

    __slots__ = ("_callback", "left", "on_closing")

    def __init__(self) -> None:
        self._callback: Callable[[], None] | None = None
        self.left = False
        self.on_closing: Callable[[], None] | None = None

    @property
    def callback(self) -> Callable[[], None] | None:
        return self._callback

    @callback.setter
    def callback(self, callback: Callable[[], None] | None) -> None:
        self._callback = callback
        if callback is not None and self.left:
            callback()

    def notify(self) -> None:
        if self.left:
            return  # told once
        self.left = True
        if self._callback is not None:
            self._callback()

    def closing(self) -> None:
        if self.on_closing is not None:
            self.on_closing()


class Reason:
    CLIENT_GONE = "client_gone"
    IDLE = "idle"
    SHUTDOWN = "shutdown"  # the server shuts down while the request waits for a model start


class Interrupter:
    """Cancels the relay task when the client disconnects or the backend stays silent."""

    def __init__(
        self,
        task: asyncio.Task[Any],
        scope: Scope,
        receive: Receive,
        loop: asyncio.AbstractEventLoop,
        deadlines: Sweeper[Interrupter],
    ) -> None:
        self.reason: str | None = None
        self._client_gone = False
        self._deadlines = deadlines
        self._task = task
        self._loop = loop
        self._limit = 0.0
        self._last = 0.0
        self._watcher: asyncio.Task[None] | None = None
        self._gone: ClientGone | None = scope.get("extensions", {}).get(CLIENT_GONE)
        if self._gone is not None:
            self._gone.callback = self._client_left
        else:
            self._watcher = loop.create_task(self._watch(receive))

    def arm(self, seconds: float) -> None:
        """From now on, interrupt after ``seconds`` without a `touch`."""
        if self._limit == 0.0:
            self._deadlines.add(self, self._loop)
        self._limit = seconds
        self._last = self._loop.time()

    @contextlib.contextmanager
    def shutdown_interrupts(self) -> Iterator[None]:
        """Inside this block the server's shutdown interrupts too (a graceful shutdown
        otherwise waits for every open request, and a start can take minutes)."""
        if self._gone is None:
            yield
            return
        self._gone.on_closing = lambda: self._interrupt(Reason.SHUTDOWN)
        try:
            yield
        finally:
            self._gone.on_closing = None

    def touch(self) -> None:
        self._last = self._loop.time()

    def reset(self) -> None:
        """Back to no deadline and no interruption, as new: a fallback takes the request on
        from the start (after a deadline that interrupted, maybe). A client that left
        meanwhile still interrupts, at once."""
        self._deadlines.discard(self, self._loop)
        self._limit = 0.0
        self.reason = None
        if self._client_gone:
            self._interrupt(Reason.CLIENT_GONE)

    def stop(self) -> None:
        self._deadlines.discard(self, self._loop)
        self._limit = 0.0
        if self._gone is not None:
            self._gone.callback = self._gone.on_closing = None
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def check(self, now: float) -> None:
        if self._limit and now - self._last >= self._limit:
            self._interrupt(Reason.IDLE)

    async def _watch(self, receive: Receive) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self._client_left()
                return

    def _client_left(self) -> None:
        self._client_gone = True
        self._interrupt(Reason.CLIENT_GONE)

    def _interrupt(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self._task.cancel()


def deadline_sweeper(*limits: float) -> Sweeper[Interrupter]:
    """One relay's deadlines, swept often enough that the shortest fires at most a quarter late."""
    sweeper: Sweeper[Interrupter] = Sweeper(Interrupter.check)
    for limit in limits:
        sweeper.at_most_every(limit)
    return sweeper
