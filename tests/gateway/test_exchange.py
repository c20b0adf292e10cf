"""The relay's way through one request, in-process (``gateway.inprocess``: no sockets, no
sleeps): streaming as it arrives, another replica when one refuses, ejection after failures, a
stream cut mid-body, a client leaving. The same behaviours over real sockets and processes are
in test_relay.py and test_replicas.py; against real vLLM in tests/integration."""

from __future__ import annotations

import asyncio

import orjson

from backends.pool import Ejection
from gateway.h1 import ClosedEarly
from gateway.inprocess import Reply, Sent, refused, script
from tests.gateway.asgi import DEADLINE
from tests.gateway.relays import InProcessRelay

A, B = "http://a.test", "http://b.test"


def error_of(body: bytes) -> dict[str, object]:
    error: dict[str, object] = orjson.loads(body)["error"]
    return error


async def test_a_json_answer_is_relayed_with_the_request_id_and_its_connection_kept() -> None:
    reply = Reply.json({"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
    relay = InProcessRelay({A: script(reply)})
    call = await relay.call().done()
    assert call.status == 200 and orjson.loads(call.body)["id"] == "x"
    assert call.headers[b"x-request-id"] == b"req-1"
    sent = relay.upstreams.sent[0]
    assert (sent.target, sent.header(b"x-request-id")) == ("/v1/chat/completions", b"req-1")
    assert reply.released and not reply.closed
    assert relay.record.usage == (3, 5) and relay.record.backend == A
    assert relay.replicas[0].in_flight == 0


async def test_stream_events_reach_the_client_before_the_backend_has_finished() -> None:
    reply = Reply.stream(more=True)
    relay = InProcessRelay({A: script(reply)})
    call = relay.call(stream=True).start()
    reply.feed(b'data: {"n": 1}\n\n')
    await call.until(lambda: b'{"n": 1}' in call.body)
    assert not call.ended and relay.pool.open_streams == 1
    reply.feed(b"data: [DONE]\n\n")
    reply.end()
    await call.done()
    assert call.body == b'data: {"n": 1}\n\ndata: [DONE]\n\n' and call.ended
    assert relay.pool.open_streams == 0 and reply.released


async def test_a_replica_that_refuses_is_skipped_for_the_next() -> None:
    relay = InProcessRelay({A: refused(), B: script(Reply.json({"from": "b"}))})
    call = await relay.call().done()
    assert call.status == 200 and orjson.loads(call.body) == {"from": "b"}
    assert [s.url for s in relay.upstreams.sent] == [A, B]
    assert relay.replicas[0].failures == 1 and relay.replicas[1].failures == 0
    assert [r.in_flight for r in relay.replicas] == [0, 0]


async def test_a_connection_closed_before_the_head_is_retried_elsewhere() -> None:
    closed = ClosedEarly("the backend closed the connection before answering", got_bytes=False)
    relay = InProcessRelay({A: script(closed), B: script(Reply.json({}))})
    assert (await relay.call().done()).status == 200
    assert [s.url for s in relay.upstreams.sent] == [A, B]


async def test_a_replica_failing_in_a_row_is_ejected_and_no_longer_asked() -> None:
    answers = script(*(Reply.json({}) for _ in range(3)))
    relay = InProcessRelay({A: refused(), B: answers}, ejection=Ejection(after=2, seconds=60))
    for _ in range(2):
        assert (await relay.call().done()).status == 200
    assert not relay.replicas[0].ready  # ejected after its second refusal
    await relay.call().done()
    assert [s.url for s in relay.upstreams.sent] == [A, B, A, B, B]


async def test_a_backends_5xx_is_passed_on_not_retried_and_counts_as_a_failure() -> None:
    """Once a backend answered, the request may have run there: it is never sent twice."""
    boom = Reply.json({"error": "boom"}, status=500)
    relay = InProcessRelay({A: script(boom), B: script(Reply.json({}))})
    call = await relay.call().done()
    assert call.status == 500 and orjson.loads(call.body) == {"error": "boom"}
    assert [s.url for s in relay.upstreams.sent] == [A]
    assert relay.replicas[0].failures == 1


async def test_every_replica_refusing_is_503_with_retry_after() -> None:
    relay = InProcessRelay({A: refused(), B: refused()})
    call = await relay.call().done()
    assert call.status == 503 and call.headers[b"retry-after"] == b"5"
    assert error_of(call.body)["code"] == "backend_unavailable"
    assert relay.record.error == "backend_unavailable"


async def test_a_stream_cut_mid_body_ends_with_an_error_event_and_done() -> None:
    reply = Reply.stream([b'{"n": 1}'], more=True)
    relay = InProcessRelay({A: script(reply)})
    call = relay.call(stream=True).start()
    await call.until(lambda: b'{"n": 1}' in call.body)
    reply.cut()
    await call.done()
    events = call.body.split(b"\n\n")
    assert events[0] == b'data: {"n": 1}'
    assert error_of(events[1].removeprefix(b"data: "))["code"] == "bad_gateway"
    assert events[2] == b"data: [DONE]" and call.ended
    assert reply.closed and relay.record.error == "bad_gateway"


async def test_a_client_leaving_mid_stream_drops_the_backends_connection() -> None:
    """Dropping it is how vLLM learns to stop generating."""
    reply = Reply.stream([b'{"n": 1}'], more=True)
    relay = InProcessRelay({A: script(reply)})
    call = relay.call(stream=True).start()
    await call.until(lambda: b'{"n": 1}' in call.body)
    call.leave()
    await call.done()
    assert reply.closed and not reply.released
    assert relay.record.error == "client_gone" and relay.record.status == 200
    assert relay.replicas[0].in_flight == 0 and relay.pool.open_streams == 0


async def test_a_client_leaving_before_the_head_is_counted_as_499() -> None:
    asked = asyncio.Event()

    async def silent(sent: Sent) -> Reply:
        asked.set()
        await asyncio.Event().wait()  # never answers; cancelled when the client leaves
        raise AssertionError("unreachable")

    relay = InProcessRelay({A: silent})
    call = relay.call().start()
    await asyncio.wait_for(asked.wait(), DEADLINE)
    call.leave()
    await call.done()
    assert call.messages == [] and relay.record.status == 499
    assert relay.replicas[0].in_flight == 0
