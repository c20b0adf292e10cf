"""Requests through the relay to a model with a queue, in-process: who reaches the backend
first, what a full queue or a long wait answers, a client leaving while it waits, an
on-demand start waiting in the same queue, and what vLLM is told of the priority."""

from __future__ import annotations

import orjson
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from backends.life import ModelLife
from backends.on_demand import OnDemandModel
from backends.on_demand_api import OnDemand
from backends.pool import Replica, ReplicaPool
from backends.queues import ModelQueue, QueueLimits
from backends.swaps import Switchboard
from gateway.boundary import ErrorBoundary
from gateway.inprocess import InProcessUpstreams, Reply, Sent
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.relay import Relay, RelayLimits
from gateway.routing import RouteTable
from gateway.traffic.priorities import LAST, PRIORITY_HEADER
from tests.backends.test_on_demand import GatedServers
from tests.gateway.asgi import Call
from tests.gateway.relays import Recording
from tests.helpers import until

LIMITS = RelayLimits(max_body_bytes=1 << 20, first_byte_timeout=60, idle_timeout=60)


class Held:
    """A backend that answers each request only when the test lets it end (``finish``)."""

    def __init__(self) -> None:
        self.requests: list[tuple[Sent, Reply]] = []

    async def __call__(self, sent: Sent) -> Reply:
        reply = Reply(200, [(b"content-type", b"application/json")], [b"{}"], more=True)
        self.requests.append((sent, reply))
        return reply

    @property
    def labels(self) -> list[str]:
        return [orjson.loads(sent.body)["user"] for sent, _ in self.requests]

    async def finish(self, count: int = 1) -> None:
        """End the oldest ``count`` requests still open."""
        open_ = [reply for _, reply in self.requests if not reply.let_go.is_set()]
        for reply in open_[:count]:
            reply.end()
            await reply.let_go.wait()


class Gateway:
    """The relay in front of one model ``m`` whose backend is ``held``."""

    def __init__(self, pool: ReplicaPool, held: Held, url: str = "http://a") -> None:
        self.pool = pool
        self.held = held
        self.telemetry = Recording([pool])
        upstreams = InProcessUpstreams({url: held})
        self.relay = Relay(RouteTable([(pool, [])]), upstreams, LIMITS, self.telemetry)
        self.app = ErrorBoundary(self.relay)

    @classmethod
    def capped(cls, limits: QueueLimits) -> Gateway:
        life = ModelLife("m", [Replica(url="http://a")])
        pool = ReplicaPool("m", life.replicas, life=life, queue=life.queue)
        life.queue.configure(limits)
        return cls(pool, Held())

    def call(
        self,
        label: str,
        key: ApiKey | None = None,
        header: str | None = None,
        more: list[tuple[bytes, bytes]] | None = None,
        **doc: object,
    ) -> Call:
        """A request labelled ``label`` (its `user`), from ``key``, asking for ``header``."""
        body = orjson.dumps({"model": "m", "messages": [], "user": label, **doc})
        headers = [(PRIORITY_HEADER, header.encode())] if header is not None else []
        call = Call(self.app, "/v1/chat/completions", body, [*headers, *(more or [])])
        if key is not None:
            call.scope[SCOPE_KEY] = key
        return call.start()

    @property
    def queue(self) -> ModelQueue:
        assert self.pool.queue is not None
        return self.pool.queue


def key(name: str, priority: int = 0, weight: float = 1.0, first: int | None = None) -> ApiKey:
    first = priority if first is None else first
    return ApiKey(
        name, name.encode(), None, priority=priority, priorities=(first, LAST), weight=weight
    )


async def test_beyond_max_in_flight_requests_wait_and_go_by_priority_as_slots_free() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1))
    first = gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    calls = [
        gw.call("batch", key("b", priority=10)),
        gw.call("default", key("d")),
        gw.call("interactive", key("i", priority=-10)),
    ]
    await until(lambda: gw.queue.waiting == 3, what="three waiting")
    assert len(gw.held.requests) == 1  # the backend has one request, the rest wait
    for sent in range(2, 5):
        await gw.held.finish()
        await until(lambda n=sent: len(gw.held.requests) == n, what=f"request {sent} sent")
    await gw.held.finish(2)
    assert gw.held.labels == ["first", "interactive", "default", "batch"]
    for call in [first, *calls]:
        await call.done()
        assert call.status == 200
    assert gw.queue.in_flight == 0
    waited = gw.telemetry.records[-1].queue_wait
    assert waited is not None and waited > 0


async def test_an_interactive_request_finds_a_reserved_slot_while_batch_requests_wait() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=2, reserved=((-10, 1),)))
    nightly = key("nightly", priority=10)
    batch = [gw.call(f"batch-{i}", nightly) for i in range(3)]
    await until(lambda: gw.queue.waiting == 2, what="two batch requests waiting")
    assert gw.held.labels == ["batch-0"]  # the second slot is kept, though free
    interactive = gw.call("interactive", key("ui", priority=-10))
    await until(lambda: len(gw.held.requests) == 2, what="the interactive request sent")
    assert gw.held.labels == ["batch-0", "interactive"]  # at once: no batch one had to end
    await gw.held.finish(2)
    for sent in range(3, 5):
        await until(lambda n=sent: len(gw.held.requests) == n, what=f"request {sent} sent")
        await gw.held.finish()
    for call in (*batch, interactive):
        await call.done()
        assert call.status == 200
    assert gw.held.labels == ["batch-0", "interactive", "batch-1", "batch-2"]
    assert gw.queue.in_flight == 0


async def test_keys_of_one_priority_take_turns() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1))
    gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    for i in range(3):
        gw.call(f"a{i}", key("a"))
    gw.call("b0", key("b"))
    await until(lambda: gw.queue.waiting == 4, what="four waiting")
    for sent in range(2, 6):
        await gw.held.finish()
        await until(lambda n=sent: len(gw.held.requests) == n, what=f"request {sent} sent")
    assert gw.held.labels == ["first", "a0", "b0", "a1", "a2"]
    await gw.held.finish(1)


async def test_a_full_queue_answers_429_queue_full_with_retry_after() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1, max_waiting=1))
    gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    gw.call("waits")
    await until(lambda: gw.queue.waiting == 1, what="one waiting")
    refused = await gw.call("refused").done()
    assert refused.status == 429 and int(refused.headers[b"retry-after"]) >= 1
    error = orjson.loads(refused.body)["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
    assert gw.telemetry.records[-1].error == "queue_full"
    assert gw.queue.refused["queue_full"] == 1
    await gw.held.finish()
    await until(lambda: len(gw.held.requests) == 2, what="the waiting one sent")
    await gw.held.finish()


async def test_a_request_that_waits_past_max_wait_answers_429_queue_timeout() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1, max_wait=0.05))
    gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    late = await gw.call("late").done()
    assert late.status == 429 and b"retry-after" in late.headers
    assert orjson.loads(late.body)["error"]["code"] == "queue_timeout"
    assert gw.queue.waiting == 0 and len(gw.held.requests) == 1  # it never went
    await gw.held.finish()


async def test_a_client_that_leaves_while_it_waits_leaves_the_queue() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1))
    gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    gone = gw.call("gone")
    stays = gw.call("stays")
    await until(lambda: gw.queue.waiting == 2, what="two waiting")
    gone.leave()
    await gone.done()
    assert gw.queue.waiting == 1
    assert gw.telemetry.records[-1].status == 499
    await gw.held.finish()
    await until(lambda: len(gw.held.requests) == 2, what="the next one sent")
    await gw.held.finish()
    await stays.done()
    assert gw.held.labels == ["first", "stays"]


async def test_the_priority_header_asks_within_its_keys_range() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1))
    gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    batch_key = key("batchy", priority=10)  # may ask for 10 and later, not sooner
    too_soon = await gw.call("x", batch_key, header="interactive").done()
    assert too_soon.status == 403
    assert orjson.loads(too_soon.body)["error"]["code"] == "priority_not_allowed"
    unreadable = await gw.call("x", batch_key, header="urgent!").done()
    assert unreadable.status == 400
    assert orjson.loads(unreadable.body)["error"]["code"] == "invalid_priority"
    gw.call("later", batch_key, header="20")
    gw.call("batch", batch_key)
    ranged = key("ranged", priority=10, first=-10)
    gw.call("asked", ranged, header="interactive")
    await until(lambda: gw.queue.waiting == 3, what="three waiting")
    assert sorted(w.priority for w in gw.queue.waiters()) == [-10, 10, 20]
    for sent in range(2, 5):
        await gw.held.finish()
        await until(lambda n=sent: len(gw.held.requests) == n, what=f"request {sent} sent")
    assert gw.held.labels == ["first", "asked", "batch", "later"]
    await gw.held.finish(1)


async def test_vllm_is_told_the_priority_only_when_it_schedules_by_priority() -> None:
    gw = Gateway(ReplicaPool("m", [Replica(url="http://a")], priority_field=True), Held())
    assert gw.pool.queue is None  # no cap: no queue, and still the priority for vLLM
    interactive = key("i", priority=-10)
    vllms_own = [(b"x-vllm-priority", b"-1000")]  # it would win over the body: not passed
    call = gw.call("told", interactive, more=vllms_own, priority=999)  # and the client's field
    await until(lambda: len(gw.held.requests) == 1, what="sent")
    sent, _ = gw.held.requests[0]
    assert orjson.loads(sent.body)["priority"] == -10  # the key's, not the client's 999
    assert sent.header(b"x-vllm-priority") is None
    await gw.held.finish()
    await call.done()
    gw.pool.priority_field = False
    plain = gw.call("plain", interactive)
    await until(lambda: len(gw.held.requests) == 2, what="sent")
    assert "priority" not in orjson.loads(gw.held.requests[1][0].body)  # body left alone
    await gw.held.finish()
    await plain.done()


async def test_an_on_demand_start_holds_its_requests_in_the_same_queue() -> None:
    servers = GatedServers()
    model = OnDemandModel("m", OnDemand(), servers)
    Switchboard([model])
    life = model.life
    life.queue.configure(QueueLimits(max_in_flight=1, max_waiting=3, retry_after_starting=7))
    pool = ReplicaPool("m", life.replicas, life=life, on_demand=model, queue=life.queue)
    gw = Gateway(pool, Held(), url="http://m")
    calls = [
        gw.call("batch-a", key("a", priority=10)),
        gw.call("batch-b", key("b", priority=10)),
        gw.call("interactive", key("i", priority=-10)),
    ]
    await until(lambda: model.waiting == 3, what="three held for the start")
    assert servers.loads["m"] == 1 and not any(w.admitted for w in model.queue.waiters())
    full = await gw.call("one-too-many").done()
    assert full.status == 429 and full.headers[b"retry-after"] == b"7"  # retry_after.loading
    assert orjson.loads(full.body)["error"]["code"] == "queue_full"
    servers.gate("m").set()  # the start ends: slots go out by priority
    await until(lambda: len(gw.held.requests) == 1, what="the first sent")
    for sent in range(2, 4):
        await gw.held.finish()
        await until(lambda n=sent: len(gw.held.requests) == n, what=f"request {sent} sent")
    await gw.held.finish()
    assert gw.held.labels == ["interactive", "batch-a", "batch-b"]
    for call in calls:
        await call.done()
        assert call.status == 200
    served = [r for r in gw.telemetry.records if r.status == 200]
    assert all(r.start_wait and r.queue_wait and r.queue_wait >= r.start_wait for r in served)


def samples(gw: Gateway) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(gw.telemetry.metrics.registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_show_each_queue_its_length_waits_and_refusals() -> None:
    gw = Gateway.capped(QueueLimits(max_in_flight=1, max_waiting=1))
    gw.call("first")
    await until(lambda: len(gw.held.requests) == 1, what="the first request sent")
    waits = gw.call("waits")
    await until(lambda: gw.queue.waiting == 1, what="one waiting")
    await gw.call("refused").done()
    seen = samples(gw)
    model = frozenset({("model", "m")})
    assert seen[("vllm_gateway_queue_length", model)] == 1
    full = frozenset({("model", "m"), ("reason", "queue_full")})
    assert seen[("vllm_gateway_queue_rejections_total", full)] == 1
    await gw.held.finish()
    await until(lambda: len(gw.held.requests) == 2, what="the waiting one sent")
    await gw.held.finish()
    await waits.done()
    seen = samples(gw)
    assert seen[("vllm_gateway_queue_length", model)] == 0
    assert seen[("vllm_gateway_queue_wait_seconds_count", model)] == 2  # both that went
