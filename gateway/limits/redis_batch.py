"""Scripts called in one event-loop turn go to Redis together: one pipeline, one write, one
read, on one connection, however many requests asked in that turn.

Each call is still one round trip for its request; under load they share it, so a gateway
relaying thousands of requests a second neither opens a connection per request nor waits for
one. Scripts are called by their SHA-1 (EVALSHA); a Redis that does not know them (restarted,
or flushed) is sent them once and asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

FAILURES = (RedisError, OSError)  # what the client raises when Redis is unreachable or slow


class BatchLost(RuntimeError):
    """A batch that ended neither answered nor failed by Redis (cancelled, or a bug here)."""


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


@dataclass(slots=True)
class _Call:
    script: Script
    keys: list[str]
    args: list[str | int | float]
    answer: asyncio.Future[Any]


class Batches:
    def __init__(self, client: Redis) -> None:
        self._client = client
        self._waiting: list[_Call] = []
        self._sending: set[asyncio.Task[None]] = set()

    def call(
        self, script: Script, keys: list[str], args: list[str | int | float]
    ) -> asyncio.Future[Any]:
        """The script's answer, once the batch it joins has been sent and answered; the
        exception the client raised, for a batch that failed."""
        loop = asyncio.get_running_loop()
        if not self._waiting:  # the first call of this turn: the batch leaves at the next
            task = loop.create_task(self._send())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        answer: asyncio.Future[Any] = loop.create_future()
        self._waiting.append(_Call(script, keys, args, answer))
        return answer

    async def drain(self, timeout: float) -> None:
        """Batches under way, sent and answered (at close)."""
        if self._sending:
            await asyncio.wait(self._sending, timeout=timeout)

    async def _send(self) -> None:
        batch, self._waiting = self._waiting, []
        try:
            try:
                answers = await self._answers(batch)
            except FAILURES as error:  # each caller applies its policy
                answers = [error] * len(batch)
            for call, answer in zip(batch, answers, strict=True):
                if call.answer.done():  # its caller was cancelled
                    continue
                if isinstance(answer, Exception):
                    call.answer.set_exception(answer)
                else:
                    call.answer.set_result(answer)
        finally:
            for call in batch:  # cancelled here, or a bug: no caller is left waiting
                if not call.answer.done():
                    call.answer.set_exception(BatchLost("the batch to Redis was not answered"))

    async def _answers(self, batch: list[_Call]) -> list[Any]:
        """Each call's answer (an exception for a call Redis refused)."""
        answers = await self._pipeline(batch)
        unknown = [i for i, a in enumerate(answers) if isinstance(a, NoScriptError)]
        if unknown:
            for script in {batch[i].script for i in unknown}:
                await self._client.script_load(script.source)
            again = await self._pipeline([batch[i] for i in unknown])
            for i, answer in zip(unknown, again, strict=True):
                answers[i] = answer
        return answers

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:  # alone in its turn: a plain command costs less than a pipeline
            call = batch[0]
            try:
                return [
                    await self._client.evalsha(
                        call.script.sha, len(call.keys), *call.keys, *call.args
                    )
                ]
            except NoScriptError as error:
                return [error]
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        return answers
