"""The line between the control plane and one worker: JSON messages, one per line, both ways.

Three kinds of message, told apart by their keys: a notice (``{"t": ...}``) is handled at once
and in order, on the reading task, so a state snapshot is applied before anything read after
it; a request (``{"t": ..., "id": n}``) runs in a task of its own (a worker's request for a
model start may wait minutes), unless it can be answered at once (``answer_now``), and its
answer (``{"t": "answer", "id": n, ...}``) completes the
asker's ``ask``; ``{"t": "cancel", "id": n}`` cancels a request whose asker left. What one end
writes arrives in the order written, which is what lets the control plane send a model's new
state before the answer that the model is ready. What one end writes in one turn of its event loop
goes out in one write (a worker relaying many requests asks for many turns at once).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

log = logging.getLogger("vllm_gateway.workers")

Message = dict[str, Any]
LINE_LIMIT = 64 * 1024 * 1024  # bytes: the largest message (a big snapshot, a metrics share)


class ChannelClosed(Exception):
    """The other end is gone: what was asked of it will not be answered."""


class Channel:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        notice: Callable[[Message], None],
        answer: Callable[[Message], Awaitable[Message]],
        answer_now: Callable[[Message], Message | None] | None = None,
    ) -> None:
        """``notice``: handles each notice in order; ``answer``: the answer to a request;
        ``answer_now``: the answer to one that needs no waiting, or None (then ``answer``)."""
        self._reader = reader
        self._writer = writer
        self._notice = notice
        self._answer = answer
        self._answer_now = answer_now
        self._ids = itertools.count(1)
        self._asked: dict[int, asyncio.Future[Message]] = {}
        self._answering: dict[int, asyncio.Task[None]] = {}
        self._unsent: list[bytes] = []  # lines of this loop turn, written at its end
        self.closed = False

    def tell(self, message: Message) -> None:
        """Send a notice (or an answer); nothing is awaited. Dropped once the line is down."""
        self.send_line(orjson.dumps(message) + b"\n")

    def send_line(self, line: bytes) -> None:
        """A message encoded already (one document for every worker is encoded once)."""
        if self.closed or not line:
            return
        if not self._unsent:
            asyncio.get_running_loop().call_soon(self._flush)
        self._unsent.append(line)

    def _flush(self) -> None:
        lines, self._unsent = self._unsent, []
        if lines and not self.closed:
            self._writer.write(b"".join(lines))

    async def ask(self, message: Message) -> Message:
        """Send a request and wait for its answer; ChannelClosed if the line goes down first.
        A caller that is cancelled cancels the request at the other end."""
        if self.closed:
            raise ChannelClosed
        number = next(self._ids)
        answer: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._asked[number] = answer
        self.tell({**message, "id": number})
        try:
            return await answer
        except asyncio.CancelledError:
            self.tell({"t": "cancel", "id": number})
            raise
        finally:
            self._asked.pop(number, None)

    async def run(self) -> None:
        """Read until the other end closes; then every open request fails."""
        try:
            while line := await self._reader.readline():
                self._dispatch(orjson.loads(line))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.close()

    def _dispatch(self, message: Message) -> None:
        kind, number = message.get("t"), message.get("id")
        if kind == "answer":
            waiting = self._asked.get(number)  # type: ignore[arg-type]
            if waiting is not None and not waiting.done():
                waiting.set_result(message)
        elif kind == "cancel":
            task = self._answering.get(number)  # type: ignore[arg-type]
            if task is not None:
                task.cancel()
        elif number is not None:
            if self._answer_now is not None and (now := self._answer_now(message)) is not None:
                self.tell({**now, "t": "answer", "id": number})
                return
            task = asyncio.create_task(self._reply(number, message), name=f"answer:{kind}")
            task.add_done_callback(log_failure)
            self._answering[number] = task
        else:
            self._notice(message)

    async def _reply(self, number: int, message: Message) -> None:
        try:
            answer = await self._answer(message)
        except asyncio.CancelledError:
            return  # the asker left; it waits for no answer
        except BaseException:
            # A bug at this end: the asker is told (it must not wait for ever), and the
            # exception goes on, to be logged with this task (``log_failure``).
            self.tell({"t": "answer", "id": number, "failed": True})
            raise
        finally:
            self._answering.pop(number, None)
        self.tell({**answer, "t": "answer", "id": number})

    def close(self) -> None:
        if self.closed:
            return
        self._flush()  # what was told before the close goes first
        self.closed = True
        for waiting in self._asked.values():
            if not waiting.done():
                waiting.set_exception(ChannelClosed())
        for task in list(self._answering.values()):
            task.cancel()
        self._writer.close()


def log_failure(task: asyncio.Task[None]) -> None:
    """A done-callback for a task nobody awaits: an exception it ended with is a bug, shown."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("answering %s failed", task.get_name(), exc_info=exc)


async def connect(
    path: str,
    notice: Callable[[Message], None],
    answer: Callable[[Message], Awaitable[Message]],
) -> Channel:
    """A worker's end, on the control plane's unix socket."""
    reader, writer = await asyncio.open_unix_connection(path, limit=LINE_LIMIT)
    return Channel(reader, writer, notice, answer)
