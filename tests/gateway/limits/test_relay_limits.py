"""The relay holds a key's slot from before its body is read until its response has ended, the
client's leaving included, and refuses the key's next request meanwhile (in-process)."""

from __future__ import annotations

import orjson

from gateway.inprocess import Reply, script
from gateway.keys import ApiKey
from gateway.limits.local import LocalLimits
from tests.gateway.relays import InProcessRelay

A = "http://a:8000"
ONE = ApiKey("one", b"d" * 32, None, max_concurrent=1)


async def test_a_stream_holds_its_slot_until_it_ends() -> None:
    limits = LocalLimits()
    reply = Reply.stream([b'{"n": 1}'], more=True)
    relay = InProcessRelay({A: script(reply, Reply.json({}))}, key_limits=limits)
    streaming = relay.call(key=ONE, stream=True).start()
    await streaming.until(lambda: b'{"n": 1}' in streaming.body)
    assert limits.in_flight(ONE) == 1
    refused = await relay.call(key=ONE).done()
    assert refused.status == 429
    assert orjson.loads(refused.body)["error"]["code"] == "rate_limit_exceeded"
    reply.end()
    await streaming.done()
    assert limits.in_flight(ONE) == 0
    assert (await relay.call(key=ONE).done()).status == 200


async def test_a_client_that_leaves_gives_its_slot_back() -> None:
    limits = LocalLimits()
    reply = Reply.stream([b'{"n": 1}'], more=True)
    relay = InProcessRelay({A: script(reply)}, key_limits=limits)
    leaving = relay.call(key=ONE, stream=True).start()
    await leaving.until(lambda: b'{"n": 1}' in leaving.body)
    leaving.leave()
    await leaving.done()
    assert reply.closed and limits.in_flight(ONE) == 0
