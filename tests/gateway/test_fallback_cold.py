"""A model that would hold a request (an on-demand model not started, asleep or starting, or
one whose servers restart) and has fallbacks: the relay in front of an on-demand model whose
start ends when the test says (``GatedServers``) and a connect-mode fallback served in-process.

The rule: such a model does not hold a request for its start when a fallback would take it
at once; the request goes there, and the model starts all the same, for the next ones. With
no fallback ready, the request waits for the start as it always did, and a start that fails
is `unavailable` like any other.
"""

from __future__ import annotations

import asyncio

import orjson

from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel
from backends.pool import Replica, ReplicaPool
from gateway.boundary import ErrorBoundary
from gateway.inprocess import InProcessUpstreams, Reply, Sent
from gateway.relay import Relay, RelayLimits
from gateway.routing import RouteTable
from gateway.traffic.plan import Deadlines, Fallbacks, TrafficPlan
from gateway.traffic.settings import REASONS
from tests.backends.test_on_demand import GatedServers, board_of, settle, state_of
from tests.gateway.asgi import Call
from tests.gateway.relays import Recording

S = BackendState
COLD, WARM = "http://cold", "http://warm.test"  # GatedServers name a replica http://<model>


async def answer(sent: Sent) -> Reply:
    return Reply.json({"model": orjson.loads(sent.body)["model"]})


class ColdAndWarm:
    """`cold` (on demand, stopped) falls back to `warm`, whose one replica is in ``state``."""

    def __init__(self, warm: BackendState = S.READY) -> None:
        self.servers = GatedServers()
        _, models = board_of(self.servers, {"cold": 0.5})
        self.cold: OnDemandModel = models["cold"]
        cold = ReplicaPool("cold", self.servers.replicas("cold"), life=self.servers.life("cold"))
        cold.on_demand = self.cold
        self.warm_replica = Replica(url=WARM, state=warm)
        self.warm_life = ModelLife("warm", [self.warm_replica])
        warm_pool = ReplicaPool("warm", self.warm_life.replicas, life=self.warm_life)
        self.upstreams = InProcessUpstreams({COLD: answer, WARM: answer})
        plan = TrafficPlan(
            Deadlines(None, 60, 60), fallbacks={"cold": Fallbacks(("warm",), frozenset(REASONS))}
        )
        limits = RelayLimits(1 << 20, 60, 60, traffic=plan)
        table = RouteTable([(cold, []), (warm_pool, [])])
        self.app = ErrorBoundary(Relay(table, self.upstreams, limits, Recording([cold, warm_pool])))

    def call(self) -> Call:
        return Call(self.app, body=orjson.dumps({"model": "cold", "messages": []}))

    def sent_to(self) -> list[str]:
        return [s.url for s in self.upstreams.sent]


async def test_a_cold_model_sends_its_request_to_a_ready_fallback_and_starts_all_the_same() -> None:
    gw = ColdAndWarm()
    call = await gw.call().done()
    assert call.status == 200 and call.headers[b"x-vllm-gateway-model"] == b"warm"
    assert gw.sent_to() == [WARM]
    await settle()
    assert gw.cold.state is S.STARTING and gw.servers.loads["cold"] == 1
    assert gw.cold.waiting == 0  # nobody was held for it
    gw.servers.gate("cold").set()
    await state_of(gw.cold, S.READY)
    later = await gw.call().done()
    assert later.status == 200 and later.headers[b"x-vllm-gateway-model"] == b"cold"
    assert gw.sent_to() == [WARM, COLD]


async def test_a_cold_model_holds_its_request_when_no_fallback_would_take_it_now() -> None:
    gw = ColdAndWarm(warm=S.UNHEALTHY)
    call = gw.call().start()
    await settle()
    assert gw.cold.waiting == 1 and not call.messages  # held for the start
    gw.servers.gate("cold").set()
    await call.done()
    assert call.status == 200 and call.headers[b"x-vllm-gateway-model"] == b"cold"
    assert gw.sent_to() == [COLD]


async def test_a_start_that_fails_falls_back_to_what_is_ready_by_then() -> None:
    gw = ColdAndWarm(warm=S.UNHEALTHY)
    call = gw.call().start()
    await settle()
    assert gw.cold.waiting == 1
    await gw.warm_life.move(S.READY, gw.warm_replica)  # the fallback recovers meanwhile
    gw.servers.failing.add("cold")
    gw.servers.gate("cold").set()
    await call.done()
    assert call.status == 200 and call.headers[b"x-vllm-gateway-model"] == b"warm"
    assert gw.sent_to() == [WARM]


async def test_a_client_that_leaves_during_the_start_leaves_nothing_behind() -> None:
    gw = ColdAndWarm(warm=S.UNHEALTHY)
    call = gw.call().start()
    await settle()
    call.leave()
    await call.done()
    assert gw.cold.waiting == 0 and gw.sent_to() == []
    gw.servers.gate("cold").set()
    await asyncio.wait_for(state_of(gw.cold, S.READY), 10)  # the start went on
