"""How long a client waits for an on-demand model: `x-vllm-gateway-max-wait`, or its key's
`max_wait`. The relay in-process in virtual time, its model on timed fake servers: a wait
estimated too long is a 503 at once with Retry-After and the estimate; bad values are 400s;
what the scheduler knows is shown in the admin document and the metrics."""

from __future__ import annotations

import orjson

from backends.cost_policy import CostPolicy
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.on_demand import OnDemandModel
from backends.swaps import Switchboard
from gateway.inprocess import Reply, Sent
from gateway.keys import SCOPE_KEY, ApiKey
from gateway.pool_metrics import PoolCollector
from gateway.status import model_document
from tests.backends.timed import TimedServers, asleep_config, virtual
from tests.gateway.relays import MODEL, InProcessRelay

URL = "http://m"


async def answer(sent: Sent) -> Reply:
    return Reply.json({"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})


def on_demand_relay(**config: object) -> tuple[InProcessRelay, OnDemandModel]:
    """Model `m` on demand: a start takes 1 (virtual) second, estimated from the config."""
    relay = InProcessRelay({URL: answer})
    servers = TimedServers({"start": 1.0})
    replica = relay.replicas[0]
    replica.state, replica.gpus, replica.share = BackendState.STOPPED, (0,), 0.6
    servers.lives[MODEL] = ModelLife(MODEL, relay.replicas, on_demand=True)
    servers.weights[MODEL] = 0.0
    model = OnDemandModel(MODEL, asleep_config(**config), servers)
    Switchboard([model], policy=CostPolicy())
    relay.pool.on_demand = model
    return relay, model


def with_key(relay: InProcessRelay, max_wait: float | None, *headers: tuple[bytes, bytes]):  # type: ignore[no-untyped-def]
    call = relay.call()
    call.scope["headers"] += list(headers)
    call.scope[SCOPE_KEY] = ApiKey("team", b"", None, max_wait=max_wait)
    return call


def error_of(body: bytes) -> dict[str, object]:
    error: dict[str, object] = orjson.loads(body)["error"]
    return error


@virtual
async def test_a_wait_estimated_longer_than_the_header_allows_is_a_503_at_once() -> None:
    relay, model = on_demand_relay(costs={"start": 60.0})
    call = await with_key(relay, None, (b"x-vllm-gateway-max-wait", b"5")).done()
    assert call.status == 503 and call.headers[b"retry-after"] == b"60"
    error = error_of(call.body)
    assert error["code"] == "max_wait_exceeded" and "about 60.0s" in str(error["message"])
    assert model.refused["deadline"] == 1 and relay.record.status == 503


@virtual
async def test_the_keys_max_wait_applies_when_the_header_is_absent_and_the_header_wins() -> None:
    relay, _ = on_demand_relay(costs={"start": 60.0})
    refused = await with_key(relay, 5.0).done()
    assert refused.status == 503 and error_of(refused.body)["code"] == "max_wait_exceeded"
    waited = await with_key(relay, 5.0, (b"x-vllm-gateway-max-wait", b"120")).done()
    assert waited.status == 200  # started (1 s here), within the 120 s it allowed
    assert float(waited.headers[b"x-vllm-gateway-start-wait"]) > 0


@virtual
async def test_without_a_max_wait_a_request_waits_for_the_start() -> None:
    relay, _ = on_demand_relay(costs={"start": 60.0})
    assert (await with_key(relay, None).done()).status == 200


@virtual
async def test_a_max_wait_that_is_no_positive_number_is_a_400() -> None:
    relay, model = on_demand_relay()
    for value in (b"soon", b"-1", b"0", b"inf", b"nan"):
        call = await with_key(relay, None, (b"x-vllm-gateway-max-wait", value)).done()
        assert call.status == 400, value
        assert "x-vllm-gateway-max-wait" in str(error_of(call.body)["message"])
    assert model.state is BackendState.STOPPED  # nothing was started for them


@virtual
async def test_the_admin_document_and_the_metrics_show_what_the_scheduler_knows() -> None:
    relay, _ = on_demand_relay(costs={"start": 60.0}, priority=2, pinned=True)
    await with_key(relay, None).done()  # a start (1 s), measured, then the request
    doc = model_document(relay.pool)
    assert doc["priority"] == 2 and doc["pinned"] is True and doc["estimated_wait_s"] == 0.0
    assert doc["costs"]["seconds"]["start"] == 1.0 and doc["costs"]["measured"]["start"] == 1
    assert doc["costs"]["request_s"] is not None  # the relay told it what it served
    assert doc["refused"] == {"deadline": 0, "deadline_passed": 0}
    families = {f.name: f for f in PoolCollector([relay.pool]).collect()}
    costs = families["vllm_gateway_model_cost_seconds"].samples
    start = {"model": MODEL, "phase": "start"}
    assert any(s.labels == start and abs(s.value - 1.0) < 0.01 for s in costs)
    assert "vllm_gateway_model_service_rate" in families
    assert "vllm_gateway_model_estimated_wait_seconds" in families
    assert "vllm_gateway_model_swapped_out" in families
    assert "vllm_gateway_model_refused" in families
