"""A model's queue in a worker's mirror: what it asks of the control plane for each turn, what
it gives back and when, and the refusals it raises (of the classes one process raises)."""

from __future__ import annotations

import asyncio

import pytest

from backends.errors import DeadlineUnmet, QueueFull, QueueTimeout
from backends.lifecycle import BackendState
from backends.queues import QueueLimits
from gateway.errors import MaxWaitExceeded
from gateway.workers.channel import Message
from gateway.workers.mirror import Mirror
from gateway.workers.refusals import refusal, refused
from gateway.workers.turns import RemoteQueue
from tests.gateway.workers.test_mirror import ControlPlane


class Plane:
    """The channel's other end: each ask waits for the test's answer."""

    def __init__(self) -> None:
        self.notices: list[Message] = []
        self.asked: list[Message] = []
        self.answers: asyncio.Queue[Message] = asyncio.Queue()

    def tell(self, message: Message) -> None:
        self.notices.append(message)

    async def ask(self, message: Message) -> Message:
        self.asked.append(message)
        return await self.answers.get()


def queue_of(
    plane: Plane, capped: bool, on_demand: bool = False, serving: bool = False
) -> RemoteQueue:
    control = ControlPlane("a", replicas=1)
    pool, life = control.pools[0], control.lives["a"]
    life.queue.configure(QueueLimits(max_in_flight=2 if capped else None))
    pool.queue = life.queue
    if on_demand:
        control.on_demand("a")
        if serving:
            life.state = BackendState.READY
    mirror = Mirror(None, 0, plane.tell, plane.ask)
    mirror.apply(control.document(), 1)
    queue = mirror.pools[0].queue
    assert isinstance(queue, RemoteQueue)
    return queue


async def test_each_turn_is_asked_for_with_its_priority_key_and_weight_and_given_back_once() -> (
    None
):
    plane = Plane()
    queue = queue_of(plane, capped=True)
    plane.answers.put_nowait({})
    slot = await queue.admit(-10, "k", 2.0)
    assert plane.asked == [
        {"t": "turn", "model": "a", "n": 1, "priority": -10, "key": "k", "weight": 2.0, "up": False}
    ]
    slot.release()
    slot.release()
    assert plane.notices == [{"t": "done", "n": 1}]


async def test_without_a_cap_a_model_that_serves_asks_nothing_and_one_that_does_not_asks() -> None:
    plane = Plane()
    assert not queue_of(plane, capped=False).capped
    (await queue_of(plane, capped=False).admit()).release()
    assert plane.asked == [] and plane.notices == []
    cold = queue_of(plane, capped=False, on_demand=True)
    plane.answers.put_nowait({})

    async def start() -> None:
        pass

    await cold.admit(bring_up=start)
    assert plane.asked[0]["t"] == "turn" and plane.asked[0]["up"] is True


@pytest.mark.parametrize("capped", [False, True])
async def test_a_request_for_an_on_demand_model_that_serves_awaits_its_bring_up_first(
    capped: bool,
) -> None:
    """As one process's queue does: it returns at once, and counts the request's arrival
    (``RemoteStart.ready``); then a turn is asked for only where the queue caps requests."""
    plane = Plane()
    queue = queue_of(plane, capped=capped, on_demand=True, serving=True)
    brought: list[bool] = []

    async def start() -> None:
        brought.append(True)

    plane.answers.put_nowait({})
    (await queue.admit(bring_up=start)).release()
    assert brought == [True]
    assert [m["up"] for m in plane.asked] == ([True] if capped else [])


async def test_a_request_that_leaves_while_it_waits_says_its_turn_is_done() -> None:
    plane = Plane()
    queue = queue_of(plane, capped=True)
    waiting = asyncio.create_task(queue.admit())
    while not plane.asked:
        await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert plane.notices == [{"t": "done", "n": 1}]  # a turn given to it meanwhile goes back


@pytest.mark.parametrize(
    "error",
    [
        QueueFull("full", retry_after=3.0),
        QueueTimeout("waited", retry_after=4.0),
        DeadlineUnmet("too late", retry_after=5.0, estimate=7.0, passed=True),
    ],
)
async def test_a_refusal_is_raised_as_the_class_the_control_plane_raised(
    error: QueueFull | DeadlineUnmet,
) -> None:
    plane = Plane()
    queue = queue_of(plane, capped=True)
    plane.answers.put_nowait({"error": refusal(error)})
    with pytest.raises(type(error), match=str(error)) as raised:
        await queue.admit()
    assert type(raised.value) is type(error) and raised.value.retry_after == error.retry_after
    assert refused(refusal(error)).estimate == error.estimate
    if isinstance(error, DeadlineUnmet):
        assert isinstance(raised.value, DeadlineUnmet) and raised.value.passed


async def test_a_start_this_worker_ran_for_its_turn_fails_with_the_requests_own_error() -> None:
    plane = Plane()
    queue = queue_of(plane, capped=True, on_demand=True)
    mine = MaxWaitExceeded("not within 0.5 s", retry_after=2)

    async def start() -> None:
        raise mine

    waiting = asyncio.create_task(queue.admit(bring_up=start))
    while not plane.asked:
        await asyncio.sleep(0)
    assert await queue.turns.bring_up(1) == {"down": True}  # the control plane's `up`
    plane.answers.put_nowait({"down": True})
    with pytest.raises(MaxWaitExceeded) as raised:
        await waiting
    assert raised.value is mine


def test_a_worker_knows_when_a_models_servers_schedule_by_priority() -> None:
    """So that it tells vLLM the request's priority in the body, as one process does."""
    control, plane = ControlPlane("a", "b", replicas=1), Plane()
    control.pools[0].priority_field = True
    mirror = Mirror(None, 0, plane.tell, plane.ask)
    mirror.apply(control.document(), 1)
    assert [pool.priority_field for pool in mirror.pools] == [True, False]
    assert [pool.queue for pool in mirror.pools] == [None, None]  # no queue: nothing asked
