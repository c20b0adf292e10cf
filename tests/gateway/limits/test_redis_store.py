"""Limits counted in a real Redis (Debian's redis-server): one bucket and one in-flight count
per key for every gateway instance that names it, a dead instance's slots dropped, and the
`on_error` policy while Redis is stopped."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from gateway.errors import LimitsUnavailable, RateLimited
from gateway.keys import ApiKey
from gateway.limits import redis_store
from gateway.limits.redis_store import RedisLimits
from gateway.limits.settings import LimitsStoreSettings
from tests.helpers import until
from tests.redis_server import RedisServer

pytestmark = pytest.mark.servers  # starts a redis-server on loopback


def key(name: str = "k", rpm: int | None = None, concurrent: int | None = None) -> ApiKey:
    return ApiKey(name, b"d" * 32, None, requests_per_minute=rpm, max_concurrent=concurrent)


def settings(server: RedisServer, **extra: object) -> LimitsStoreSettings:
    """A prefix of its own per test: tests share the session's Redis."""
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    store = LimitsStoreSettings.model_validate({"url": server.url, "prefix": prefix, **extra})
    env = {} if server.password is None else {"VLLM_GATEWAY_REDIS_PASSWORD": server.password}
    return store.with_password_from(env)


async def gateways(store: LimitsStoreSettings, count: int = 2) -> list[RedisLimits]:
    started = [RedisLimits(store, instance=f"gateway-{i}") for i in range(count)]
    for limits in started:
        await limits.start()
    return started


@pytest.fixture
async def pair(redis_server: RedisServer) -> AsyncIterator[list[RedisLimits]]:
    both = await gateways(settings(redis_server))
    yield both
    for limits in both:
        await limits.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may stop."""
    server = RedisServer()
    yield server
    server.stop()


async def test_two_gateways_draw_from_one_bucket(pair: list[RedisLimits]) -> None:
    first, second = pair
    five = key(rpm=5)
    for limits in (first, second, first, second, first):
        assert await limits.ask(five) is False  # admitted, no slot to give back
    for limits in pair:
        with pytest.raises(RateLimited) as refused:
            await limits.ask(five)
        assert 1 <= refused.value.retry_after <= 12  # one token every 12 s


async def test_max_concurrent_holds_across_gateways(pair: list[RedisLimits]) -> None:
    first, second = pair
    four = key(concurrent=4)
    assert [await g.ask(four) for g in (first, first, second, second)] == [True] * 4
    for limits in pair:
        with pytest.raises(RateLimited):
            await limits.ask(four)
    first.release(four)
    await first.flushed()
    assert await second.ask(four)
    assert (first.held(four), second.held(four)) == (1, 3)


async def test_requests_asking_at_once_share_a_round_trip_and_survive_a_script_flush(
    pair: list[RedisLimits], redis_server: RedisServer
) -> None:
    first, _ = pair
    many = key(concurrent=50)
    redis_server.client().script_flush()  # as a restarted Redis: it knows no script
    answers = await asyncio.gather(*(first.ask(many) for _ in range(60)), return_exceptions=True)
    assert answers.count(True) == 50
    assert all(isinstance(a, RateLimited) for a in answers if a is not True)
    assert first.held(many) == 50 and not first.outage.down


async def test_a_request_cancelled_while_redis_answers_gives_its_slot_back(
    pair: list[RedisLimits],
) -> None:
    first, second = pair
    one = key(concurrent=1)
    asking = asyncio.ensure_future(first.ask(one))
    await asyncio.sleep(0)  # its batch is on its way
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    await first.flushed()
    await first.flushed()  # the release its answer sent
    assert first.held(one) == 0
    assert await second.ask(one)


async def test_counters_are_named_by_the_keys_digest(
    pair: list[RedisLimits], redis_server: RedisServer
) -> None:
    first = pair[0]
    await first.ask(key("team-secret-name", rpm=10, concurrent=2))
    names = [n.decode() for n in redis_server.client().keys(f"{first.settings.prefix}:*")]
    digest = hashlib.sha256(b"team-secret-name").hexdigest()[:32]
    prefix = first.settings.prefix
    assert sorted(names) == [
        f"{prefix}:{digest}:bucket",
        f"{prefix}:{digest}:flight",
        f"{prefix}:instances",
    ]


async def test_a_dead_gateways_slots_are_dropped_once_it_falls_silent(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_store, "LIVE", 1.0)
    dying, living = await gateways(settings(redis_server))
    try:
        one = key(concurrent=1)
        assert await dying.ask(one)
        dying._beat.cancel()  # type: ignore[union-attr]  # it dies: no heartbeat, no release
        with pytest.raises(RateLimited):
            await living.ask(one)
        deadline = time.monotonic() + 10
        while True:  # until the dead one has been silent for LIVE seconds
            try:
                assert await living.ask(one)
                break
            except RateLimited:
                assert time.monotonic() < deadline, "the dead gateway's slot was never dropped"
                await asyncio.sleep(0.05)
    finally:
        await living.close()


async def test_redis_stopped_fail_open_lets_requests_through_and_says_so_once(
    own_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    (limits,) = await gateways(settings(own_redis), count=1)
    try:
        two = key(rpm=100, concurrent=2)
        assert await limits.ask(two)  # held in Redis
        own_redis.stop()
        with caplog.at_level(logging.ERROR, logger="vllm_gateway.limits"):
            results = [await limits.ask(two) for _ in range(5)]
        assert results == [False] * 5  # through, uncounted: nothing to give back
        assert limits.outage.down and limits.outage.decided == 5
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "fail_open" in errors[0].getMessage()
        own_redis.start()  # empty: what it counted is gone
        await until(lambda: not limits.outage.down, what="the heartbeat to find Redis again")
        flight = limits._keys(two)[1]
        assert own_redis.client().hget(flight, limits.instance) == b"1"  # written again
        assert await limits.ask(two)
        with pytest.raises(RateLimited):
            await limits.ask(two)  # counted in Redis again: 2 of 2
    finally:
        await limits.close()


async def test_redis_stopped_fail_closed_refuses_with_503(own_redis: RedisServer) -> None:
    (limits,) = await gateways(settings(own_redis, on_error="fail_closed"), count=1)
    try:
        own_redis.stop()
        with pytest.raises(LimitsUnavailable) as refused:
            await limits.ask(key(rpm=100))
        assert refused.value.status == 503 and refused.value.retry_after == 5
        assert limits.outage.decided == 1
    finally:
        await limits.close()


async def test_a_gateway_that_starts_while_redis_is_down_applies_its_policy(
    own_redis: RedisServer,
) -> None:
    store = settings(own_redis)
    own_redis.stop()
    (limits,) = await gateways(store, count=1)
    try:
        assert limits.outage.down
        assert await limits.ask(key(concurrent=1)) is False
        own_redis.start()
        await until(lambda: not limits.outage.down, what="Redis to be found")
        assert await limits.ask(key(concurrent=1))
    finally:
        await limits.close()


async def test_the_password_comes_from_the_environment_and_never_shows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = RedisServer(password="s3cret-pass")
    try:
        good = settings(server)
        (limits,) = await gateways(good, count=1)
        assert await limits.ask(key(concurrent=1)) and not limits.outage.down
        await limits.close()
        without = LimitsStoreSettings(url=server.url, prefix="test-nopass")
        with caplog.at_level(logging.ERROR, logger="vllm_gateway.limits"):
            (refused,) = await gateways(without, count=1)
        assert refused.outage.down  # Redis wants a password: unreachable for limits
        await refused.close()
        assert "limits store" in caplog.text and "s3cret-pass" not in caplog.text
        assert "s3cret-pass" not in repr(good) and "s3cret-pass" not in str(good.model_dump())
    finally:
        server.stop()
