"""A request's priority reaches its on-demand model (``ready(priority=...)``) whether or not
the model has a queue: the swap scheduler weighs a model's demand by the priorities that asked
for it (``OnDemandModel.asked_with``), so a start held for an urgent request counts as urgent."""

from __future__ import annotations

import orjson

from backends.lifecycle import BackendState
from gateway.traffic.priorities import PRIORITY_HEADER
from tests.backends.test_on_demand import settle, state_of
from tests.gateway.asgi import Call
from tests.gateway.test_fallback_cold import ColdAndWarm


def urgent(gw: ColdAndWarm, priority: bytes) -> Call:
    body = orjson.dumps({"model": "cold", "messages": []})
    return Call(gw.app, body=body, headers=[(PRIORITY_HEADER, priority)])


async def test_a_start_held_for_a_request_counts_its_priority() -> None:
    gw = ColdAndWarm(warm=BackendState.UNHEALTHY)  # no fallback takes it: held for the start
    call = urgent(gw, b"-5").start()
    await settle()
    assert gw.cold.waiting == 1 and set(gw.cold.asked_with) == {-5}
    gw.servers.gate("cold").set()
    await call.done()
    assert call.status == 200
    await state_of(gw.cold, BackendState.READY)
    assert (await urgent(gw, b"3").done()).status == 200  # served at once: counted too
    assert set(gw.cold.asked_with) == {-5, 3}


async def test_a_priority_header_that_will_not_do_is_refused_before_any_start() -> None:
    gw = ColdAndWarm(warm=BackendState.UNHEALTHY)
    call = await urgent(gw, b"soonest-please").done()
    assert call.status == 400 and b"x-vllm-gateway-priority" in call.body
    assert gw.servers.loads.get("cold", 0) == 0
