"""A model's queue with `workers: N`: one queue, the control plane's, for the requests of every
worker: `max_in_flight` holds across workers, waiters go by priority whichever worker they
came through, a full queue answers 429 `queue_full`, a turn goes back when its exchange ends,
when its client leaves, or when its worker's channel closes; a model without a queue asks for
nothing. In-process: the real ``Plane`` and ``Worker`` over real channels."""

from __future__ import annotations

from pathlib import Path

import orjson

from gateway.traffic.priorities import PRIORITY_HEADER
from gateway.workers.turns import RemoteQueue
from gateway.workers.worker import Worker
from tests.gateway.asgi import Call
from tests.gateway.traffic.test_queueing import Held
from tests.gateway.workers.rig import Gateway, two_workers
from tests.helpers import until


def chat(worker: Worker, label: str, priority: str | None = None) -> Call:
    body = orjson.dumps({"model": "m", "messages": [], "user": label})
    headers = [(PRIORITY_HEADER, priority.encode())] if priority is not None else []
    return Call(worker, body=body, headers=headers).start()


def waiting(gw: Gateway) -> int:
    queue = gw.runtime.pools[0].queue
    assert queue is not None
    return queue.waiting


async def test_max_in_flight_holds_across_both_workers(tmp_path: Path) -> None:
    held = Held()
    async with two_workers(tmp_path, {"queue": {"max_in_flight": 2}}, held) as gw:
        first, second = gw.workers
        assert isinstance(first.mirror.pools[0].queue, RemoteQueue)
        calls = [chat(first, "a"), chat(second, "b")]
        await until(lambda: len(held.requests) == 2, what="two requests at the backend")
        calls += [chat(first, "c"), chat(second, "d")]
        await until(lambda: waiting(gw) == 2, what="two waiting at the control plane")
        assert len(held.requests) == 2
        await held.finish()
        await until(lambda: len(held.requests) == 3, what="the next one in")
        assert waiting(gw) == 1
        await held.finish(2)
        await until(lambda: len(held.requests) == 4, what="the last one in")
        await held.finish()
        for call in calls:
            assert (await call.done()).status == 200
        assert gw.runtime.pools[0].queue.in_flight == 0  # type: ignore[union-attr]


async def test_waiters_go_by_priority_whichever_worker_they_came_through(tmp_path: Path) -> None:
    held = Held()
    async with two_workers(tmp_path, {"queue": {"max_in_flight": 1}}, held) as gw:
        first, second = gw.workers
        calls = [chat(first, "running")]
        await until(lambda: len(held.requests) == 1, what="one at the backend")
        calls.append(chat(first, "batch", "batch"))
        await until(lambda: waiting(gw) == 1, what="the batch request waiting")
        calls.append(chat(second, "default"))
        await until(lambda: waiting(gw) == 2, what="the default one waiting")
        calls.append(chat(first, "interactive", "interactive"))
        await until(lambda: waiting(gw) == 3, what="the interactive one waiting")
        for expected in range(2, 5):
            await held.finish()
            await until(lambda n=expected: len(held.requests) == n, what="the next turn")  # type: ignore[misc]
        await held.finish()
        assert held.labels == ["running", "interactive", "default", "batch"]
        for call in calls:
            assert (await call.done()).status == 200


async def test_a_full_queue_answers_429_queue_full_on_either_worker(tmp_path: Path) -> None:
    held = Held()
    queue = {"max_in_flight": 1, "max_waiting": 1}
    async with two_workers(tmp_path, {"queue": queue}, held) as gw:
        first, second = gw.workers
        calls = [chat(first, "running")]
        await until(lambda: len(held.requests) == 1, what="one at the backend")
        calls.append(chat(second, "waits"))
        await until(lambda: waiting(gw) == 1, what="one waiting")
        for worker in gw.workers:
            refused = await chat(worker, "refused").done()
            assert refused.status == 429
            assert orjson.loads(refused.body)["error"]["code"] == "queue_full"
            assert int(refused.headers[b"retry-after"]) >= 1
        await held.finish()
        await until(lambda: len(held.requests) == 2, what="the waiter's turn")
        await held.finish()
        for call in calls:
            assert (await call.done()).status == 200


async def test_a_client_that_leaves_gives_its_place_and_a_closed_worker_its_turns(
    tmp_path: Path,
) -> None:
    held = Held()
    async with two_workers(tmp_path, {"queue": {"max_in_flight": 1}}, held) as gw:
        first, second = gw.workers
        chat(first, "running")
        await until(lambda: len(held.requests) == 1, what="one at the backend")
        leaving = chat(second, "leaves")
        await until(lambda: waiting(gw) == 1, what="it waits")
        leaving.leave()
        await until(lambda: waiting(gw) == 0, what="its place given back")
        last = chat(second, "last")
        await until(lambda: waiting(gw) == 1, what="the next one waiting")
        assert first.channel is not None
        first.channel.close()  # as when its process dies: the turn it holds goes back
        await until(lambda: len(held.requests) == 2, what="the turn given to the next")
        assert held.labels == ["running", "last"]
        await held.finish(2)
        assert (await last.done()).status == 200


async def test_a_model_without_a_queue_asks_the_control_plane_for_nothing(tmp_path: Path) -> None:
    async with two_workers(tmp_path, {}) as gw:
        worker = gw.workers[0]
        assert worker.mirror.pools[0].queue is None
        asked: list[object] = []
        real = worker.mirror.turns.take

        async def counting(*args: object) -> object:
            asked.append(args)
            return await real(*args)  # type: ignore[arg-type]

        worker.mirror.turns.take = counting  # type: ignore[method-assign]
        assert (await chat(worker, "x").done()).status == 200
        assert asked == []
