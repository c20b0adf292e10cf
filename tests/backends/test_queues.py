"""A model's queue: who goes when a slot frees (priority, then fairness between keys, then
arrival), its bounds, and waiters that leave. No servers: a test holds and releases slots."""

from __future__ import annotations

import asyncio

import pytest

from backends.errors import QueueFull, QueueTimeout
from backends.queues import ModelQueue, QueueLimits, Slot


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


class Line:
    """Requests waiting in one queue, each labelled; ``serve`` lets them through one by one
    (one slot), and says in which order they went."""

    def __init__(self, queue: ModelQueue) -> None:
        self.queue = queue
        self.tasks: dict[str, asyncio.Task[Slot]] = {}

    def join(self, label: str, priority: int = 0, key: str = "", weight: float = 1.0) -> None:
        self.tasks[label] = asyncio.create_task(self.queue.admit(priority, key, weight))

    async def serve(self, first: Slot) -> list[str]:
        """Release ``first``, then each slot as it is handed out, until nobody waits."""
        await settle()
        gone = {label for label, t in self.tasks.items() if t.done()}
        order: list[str] = []
        slot = first
        while True:
            slot.release()
            await settle()
            seen = gone | set(order)
            done = [label for label, t in self.tasks.items() if t.done() and label not in seen]
            if not done:
                return order
            assert len(done) == 1, f"one slot, yet {done} all went"
            order.append(done[0])
            slot = self.tasks[done[0]].result()


async def one_slot_taken(queue: ModelQueue) -> Slot:
    queue.configure(QueueLimits(max_in_flight=1))
    return await queue.admit()


async def test_a_model_without_a_cap_lets_every_request_go_at_once() -> None:
    queue = ModelQueue("m")
    slots = [await queue.admit() for _ in range(100)]
    assert queue.in_flight == 100 and queue.waiting == 0
    for slot in slots:
        slot.release()
    assert queue.in_flight == 0


async def test_beyond_max_in_flight_requests_wait_for_a_release() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    waiter = asyncio.create_task(queue.admit())
    await settle()
    assert not waiter.done() and queue.waiting == 1
    first.release()
    second = await waiter
    assert queue.in_flight == 1 and queue.waiting == 0
    second.release()
    second.release()  # given back exactly once
    assert queue.in_flight == 0


async def test_a_slot_now_only_when_one_is_free_nobody_waits_ahead_and_the_model_serves() -> None:
    serves = [True]
    queue = ModelQueue("m", QueueLimits(max_in_flight=1), gate=lambda: serves[0])
    first = queue.admit_now()
    assert first is not None and queue.in_flight == 1
    assert queue.admit_now() is None  # full
    waiting = asyncio.create_task(queue.admit())
    await settle()
    first.release()  # the slot goes to the waiter, not to the next one asking now
    assert queue.admit_now() is None
    (await waiting).release()
    serves[0] = False
    assert queue.admit_now() is None  # free, but the model does not serve


async def test_the_lowest_priority_value_goes_first() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    line = Line(queue)
    line.join("batch", priority=10)
    line.join("default", priority=0)
    line.join("interactive", priority=-10)
    assert await line.serve(first) == ["interactive", "default", "batch"]


async def test_keys_of_one_priority_take_turns_and_each_key_keeps_its_order() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    line = Line(queue)
    for i in range(4):
        line.join(f"a{i}", key="a")
    for i in range(2):
        line.join(f"b{i}", key="b")
    assert await line.serve(first) == ["a0", "b0", "a1", "b1", "a2", "a3"]


async def test_a_key_of_weight_two_goes_twice_for_each_turn_of_weight_one() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    line = Line(queue)
    for i in range(6):
        line.join(f"a{i}", key="a", weight=2.0)
    for i in range(3):
        line.join(f"b{i}", key="b")
    order = "".join(label[0] for label in await line.serve(first))
    assert (order[:6].count("a"), order[:6].count("b")) == (4, 2)  # while both wait: 2 to 1
    assert order == "ababaabaa"  # on a tie, the key that has waited longer


async def test_a_key_that_was_idle_saves_up_no_turns() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    line = Line(queue)
    for i in range(8):
        line.join(f"a{i}", key="a")
    slot = first
    for i in range(5):  # a alone goes five times
        slot.release()
        slot = await line.tasks[f"a{i}"]
    for i in range(3):
        line.join(f"b{i}", key="b")
    order = await line.serve(slot)
    assert "".join(label[0] for label in order) == "bababa"  # taking turns, not b three times


async def test_priority_comes_before_fairness() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    line = Line(queue)
    line.join("a-batch", priority=10, key="a")
    line.join("b-batch", priority=10, key="b")
    line.join("b-interactive", priority=-10, key="b")
    line.join("b-interactive-2", priority=-10, key="b")
    assert await line.serve(first) == ["b-interactive", "b-interactive-2", "a-batch", "b-batch"]


async def test_beyond_max_waiting_a_request_is_refused_at_once_with_a_retry_after() -> None:
    queue = ModelQueue("m")
    queue.configure(QueueLimits(max_in_flight=1, max_waiting=2))
    first = await queue.admit()
    waiters = [asyncio.create_task(queue.admit()) for _ in range(2)]
    await settle()
    with pytest.raises(QueueFull) as refused:
        await queue.admit()
    assert refused.value.retry_after >= 1 and queue.refused["queue_full"] == 1
    assert queue.waiting == 2  # the refused one never joined
    first.release()
    (await waiters[0]).release()
    (await waiters[1]).release()


async def test_a_request_past_max_wait_is_refused_and_leaves_the_queue() -> None:
    queue = ModelQueue("m")
    queue.configure(QueueLimits(max_in_flight=1, max_wait=0.05))
    first = await queue.admit()
    with pytest.raises(QueueTimeout) as refused:
        await queue.admit()
    assert "max_wait" in str(refused.value) and refused.value.retry_after >= 1
    assert queue.waiting == 0 and queue.refused["queue_timeout"] == 1
    first.release()
    assert queue.in_flight == 0


async def test_a_waiter_whose_client_left_leaves_the_queue() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    line = Line(queue)
    line.join("gone")
    line.join("stays")
    await settle()
    line.tasks.pop("gone").cancel()
    await settle()
    assert queue.waiting == 1
    assert await line.serve(first) == ["stays"]


async def test_a_slot_handed_to_a_waiter_that_leaves_goes_to_the_next() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    gone = asyncio.create_task(queue.admit())
    nxt = asyncio.create_task(queue.admit())
    await settle()
    first.release()  # the slot is handed to `gone`, which is cancelled before it runs
    gone.cancel()
    slot = await nxt
    assert queue.in_flight == 1 and queue.waiting == 0
    slot.release()


async def test_a_higher_cap_lets_waiters_go_at_once_and_a_lower_one_lets_requests_finish() -> None:
    queue = ModelQueue("m")
    first = await one_slot_taken(queue)
    waiters = [asyncio.create_task(queue.admit()) for _ in range(3)]
    await settle()
    queue.configure(QueueLimits(max_in_flight=3))  # a reload
    await settle()
    assert [w.done() for w in waiters] == [True, True, False] and queue.in_flight == 3
    queue.configure(QueueLimits(max_in_flight=1))
    first.release()
    (await waiters[0]).release()
    await settle()
    assert not waiters[2].done()  # two still in flight, one allowed
    (await waiters[1]).release()
    (await waiters[2]).release()
    assert queue.in_flight == 0


async def test_while_the_model_does_not_serve_nobody_goes_and_then_they_go_in_order() -> None:
    serves = False
    queue = ModelQueue("m", QueueLimits(max_in_flight=1), gate=lambda: serves)
    line = Line(queue)
    line.join("batch", priority=10)
    line.join("interactive", priority=-10)
    await settle()
    assert queue.waiting == 2 and queue.in_flight == 0
    assert not any(w.admitted for w in queue.waiters())
    serves = True
    queue.gate_changed()
    await settle()
    assert line.tasks["interactive"].done() and not line.tasks["batch"].done()
    line.tasks["interactive"].result().release()
    (await line.tasks["batch"]).release()


async def test_the_waiters_view_says_who_waits_for_what() -> None:
    queue = ModelQueue("m", QueueLimits(max_in_flight=1, max_wait=60))
    first = await queue.admit()
    waiter = asyncio.create_task(queue.admit(priority=10, key="team-a"))
    await settle()
    (seen,) = queue.waiters()
    assert (seen.priority, seen.key, seen.admitted) == (10, "team-a", False)
    assert seen.deadline == pytest.approx(seen.enqueued + 60)
    first.release()
    (await waiter).release()
    assert queue.waiters() == ()


async def test_a_full_queue_of_a_model_that_does_not_serve_says_the_configured_wait() -> None:
    queue = ModelQueue("m", QueueLimits(max_waiting=1, retry_after_starting=7), gate=lambda: False)
    held = asyncio.create_task(queue.admit())
    await settle()
    with pytest.raises(QueueFull) as refused:
        await queue.admit()
    assert refused.value.retry_after == 7
    held.cancel()


async def test_slots_reserved_for_interactive_stay_free_while_batch_requests_wait() -> None:
    queue = ModelQueue("m", QueueLimits(max_in_flight=3, reserved=((-10, 1),)))
    batch = [asyncio.create_task(queue.admit(priority=10)) for _ in range(3)]
    await settle()
    assert [t.done() for t in batch] == [True, True, False]  # the third slot is kept
    assert queue.in_flight == 2 and queue.waiting == 1
    interactive = await queue.admit(priority=-10)  # finds it free: no wait for a batch one
    assert queue.in_flight == 3
    interactive.release()
    await settle()
    assert not batch[2].done()  # the kept slot freed again, and stays kept
    batch[0].result().release()
    (await batch[2]).release()  # a batch slot freed: the batch waiter goes
    batch[1].result().release()
    assert queue.in_flight == 0


async def test_a_freed_slot_goes_to_the_better_priority_and_a_kept_one_stays_kept() -> None:
    queue = ModelQueue("m", QueueLimits(max_in_flight=3, reserved=((-10, 2),)))
    first = await queue.admit(priority=10)  # batch may hold one: the other two are kept
    held = [await queue.admit(priority=-10) for _ in range(2)]
    batch = asyncio.create_task(queue.admit(priority=10))
    interactive = asyncio.create_task(queue.admit(priority=-10))
    await settle()
    held[0].release()
    await settle()
    assert interactive.done() and not batch.done()  # the better priority first
    held[1].release()
    await settle()
    assert not batch.done()  # interactive holds one of its two: the other stays kept
    first.release()
    (await batch).release()  # the batch slot freed: the batch waiter takes it
    interactive.result().release()
    assert queue.in_flight == 0


async def test_reservations_nest_each_priority_keeps_what_it_keeps_for_the_better_ones() -> None:
    queue = ModelQueue("m", QueueLimits(max_in_flight=4, reserved=((-10, 1), (0, 2))))
    batch = [asyncio.create_task(queue.admit(priority=10)) for _ in range(3)]
    await settle()
    assert [t.done() for t in batch] == [True, True, False]
    default = [asyncio.create_task(queue.admit(priority=0)) for _ in range(2)]
    await settle()
    assert [t.done() for t in default] == [True, False]  # default takes 3 of the 4
    interactive = await queue.admit(priority=-10)  # and interactive the last
    assert queue.in_flight == 4
    for slot in (interactive, default[0].result(), *(t.result() for t in batch[:2])):
        slot.release()
    await settle()
    assert default[1].done() and batch[2].done()  # the better priority first, then batch
    default[1].result().release()
    batch[2].result().release()
    assert queue.in_flight == 0


async def test_the_slots_kept_for_a_priority_count_what_its_requests_hold() -> None:
    queue = ModelQueue("m", QueueLimits(max_in_flight=4, reserved=((-10, 2),)))
    interactive = [await queue.admit(priority=-10) for _ in range(2)]  # the two kept ones
    batch = [asyncio.create_task(queue.admit(priority=10)) for _ in range(3)]
    await settle()
    assert [t.done() for t in batch] == [True, True, False]  # the rest of the cap, not less
    interactive[0].release()
    await settle()
    assert not batch[2].done()  # interactive holds one: one more stays kept for it
    for slot in (interactive[1], *(t.result() for t in batch[:2])):
        slot.release()
    (await batch[2]).release()
    assert queue.in_flight == 0


async def test_a_full_queue_still_lets_in_a_request_that_finds_a_slot_kept_for_it() -> None:
    limits = QueueLimits(max_in_flight=2, max_waiting=1, reserved=((-10, 1),))
    queue = ModelQueue("m", limits)
    first = await queue.admit(priority=10)
    waiting = asyncio.create_task(queue.admit(priority=10))
    await settle()
    with pytest.raises(QueueFull):
        await queue.admit(priority=10)
    interactive = await queue.admit(priority=-10)  # goes at once: no waiter
    for slot in (interactive, first):
        slot.release()
    (await waiting).release()
    assert queue.in_flight == 0


async def test_a_reload_that_drops_a_reservation_lets_the_waiters_go_at_once() -> None:
    queue = ModelQueue("m", QueueLimits(max_in_flight=2, reserved=((-10, 1),)))
    first = await queue.admit(priority=10)
    waiter = asyncio.create_task(queue.admit(priority=10))
    await settle()
    assert not waiter.done()
    queue.configure(QueueLimits(max_in_flight=2))  # a reload
    (await waiter).release()
    queue.configure(QueueLimits(max_in_flight=2, reserved=((-10, 1),)))
    second = asyncio.create_task(queue.admit(priority=10))
    await settle()
    assert not second.done()  # reserved again: first still holds the one batch slot
    first.release()
    (await second).release()
