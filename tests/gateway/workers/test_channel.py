"""The line between the control plane and a worker: notices in order, requests answered."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from gateway.workers.channel import Channel, ChannelClosed, Message
from tests.helpers import until

Answer = Callable[[Message], Awaitable[Message]]


async def _nothing(message: Message) -> Message:
    raise AssertionError(f"not asked: {message}")


class Ends:
    """Two channels on a socket pair, each with what it was told."""

    def __init__(self) -> None:
        self.told: dict[str, list[Message]] = {"a": [], "b": []}
        self.channels: dict[str, Channel] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def open(
        self,
        answer_a: Answer = _nothing,
        answer_b: Answer = _nothing,
        now_b: Callable[[Message], Message | None] | None = None,
    ) -> None:
        left, right = socket.socketpair()
        for name, sock, answer in (("a", left, answer_a), ("b", right, answer_b)):
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            now = now_b if name == "b" else None
            channel = Channel(reader, writer, self.told[name].append, answer, now)
            self.channels[name] = channel
            self.tasks.append(asyncio.create_task(channel.run()))

    async def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    pair = Ends()
    yield pair
    await pair.close()


async def test_notices_arrive_in_the_order_they_were_told(ends: Ends) -> None:
    await ends.open()
    for n in range(50):
        ends.channels["a"].tell({"t": "n", "n": n})
    await until(lambda: len(ends.told["b"]) == 50)
    assert [m["n"] for m in ends.told["b"]] == list(range(50))


async def test_a_request_is_answered_and_a_notice_told_before_the_answer_arrives_first(
    ends: Ends,
) -> None:
    """What lets the control plane send a model's new state before saying it is ready."""

    async def answer(message: Message) -> Message:
        ends.channels["b"].tell({"t": "state", "ready": True})
        return {"doubled": message["x"] * 2}

    await ends.open(answer_b=answer)
    reply = await ends.channels["a"].ask({"t": "double", "x": 21})
    assert reply["doubled"] == 42
    assert ends.told["a"] == [{"t": "state", "ready": True}]  # already applied


async def test_a_request_that_needs_no_waiting_is_answered_on_the_reading_task(
    ends: Ends,
) -> None:
    async def waited(message: Message) -> Message:
        assert ends.channels["b"]._answering  # in a task of its own
        return {"waited": True}

    def at_once(message: Message) -> Message | None:
        assert not ends.channels["b"]._answering
        return {"at_once": True} if message["t"] == "quick" else None

    await ends.open(answer_b=waited, now_b=at_once)
    assert await ends.channels["a"].ask({"t": "quick"}) == {"at_once": True, "t": "answer", "id": 1}
    assert (await ends.channels["a"].ask({"t": "slow"}))["waited"]


async def test_what_was_told_just_before_a_close_still_goes(ends: Ends) -> None:
    await ends.open()
    ends.channels["a"].tell({"t": "last"})
    ends.channels["a"].close()
    await until(lambda: ends.told["b"] == [{"t": "last"}])


async def test_an_asker_that_leaves_cancels_the_request_at_the_other_end(ends: Ends) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(message: Message) -> Message:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    await ends.open(answer_b=slow)
    asking = asyncio.create_task(ends.channels["a"].ask({"t": "slow"}))
    await asyncio.wait_for(started.wait(), 5)
    asking.cancel()
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_requests_open_when_the_line_goes_down_fail_as_closed(ends: Ends) -> None:
    async def never(message: Message) -> Message:
        await asyncio.sleep(3600)
        return {}

    await ends.open(answer_b=never)
    asking = asyncio.create_task(ends.channels["a"].ask({"t": "never"}))
    await until(lambda: bool(ends.channels["b"]._answering))
    ends.channels["b"].close()
    with pytest.raises(ChannelClosed):
        await asyncio.wait_for(asking, 5)
    with pytest.raises(ChannelClosed):
        await ends.channels["a"].ask({"t": "again"})


async def test_a_bug_answering_is_told_to_the_asker_and_logged_where_it_happened(
    ends: Ends, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(message: Message) -> Message:
        raise KeyError("bug")

    await ends.open(answer_b=broken)
    reply = await asyncio.wait_for(ends.channels["a"].ask({"t": "broken"}), 5)
    assert reply.get("failed") is True
    await until(lambda: "answering answer:broken failed" in caplog.text)
