"""The bucket arithmetic every store shares, and the in-process store (the default)."""

from __future__ import annotations

import math

import pytest

from gateway.errors import RateLimited
from gateway.keys import ApiKey
from gateway.limits.local import LocalLimits
from gateway.limits.store import over_rate, refilled


def key(name: str = "k", rpm: int | None = None, concurrent: int | None = None) -> ApiKey:
    return ApiKey(name, b"d" * 32, None, requests_per_minute=rpm, max_concurrent=concurrent)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_at_its_rate_and_holds_at_most_a_minutes_worth() -> None:
    assert refilled(0.0, 6.0, 600) == pytest.approx(60.0)  # 10 a second
    assert refilled(0.0, 120.0, 600) == 600.0
    assert refilled(math.inf, 1.0, 600) == 600.0  # never used: full
    assert refilled(5.0, -1.0, 600) == 5.0  # a clock that went back adds nothing


def test_retry_after_says_when_the_next_token_comes() -> None:
    assert over_rate(key(rpm=2), 0.0).retry_after == 30
    assert over_rate(key(rpm=2), 0.5).retry_after == 15
    assert over_rate(key(rpm=600), 0.0).retry_after == 1  # 0.1 s, at least 1


def test_a_fresh_key_gets_its_whole_minute_at_once_then_its_rate() -> None:
    clock = Clock()
    limits = LocalLimits(clock)
    slow = key(rpm=3)
    assert [limits.admit(slow) for _ in range(3)] == [False, False, False]  # no slot to hold
    with pytest.raises(RateLimited) as refused:
        limits.admit(slow)
    assert refused.value.retry_after == 20
    clock.now += 20
    limits.admit(slow)
    with pytest.raises(RateLimited):
        limits.admit(slow)


def test_max_concurrent_holds_slots_until_released() -> None:
    limits = LocalLimits(Clock())
    two = key(concurrent=2)
    assert limits.admit(two) and limits.admit(two)
    with pytest.raises(RateLimited) as refused:
        limits.admit(two)
    assert refused.value.retry_after == 1 and "2 requests in flight" in refused.value.message
    limits.release(two)
    assert limits.admit(two)
    assert limits.in_flight(two) == 2


def test_a_request_refused_for_concurrency_takes_no_token() -> None:
    limits = LocalLimits(Clock())
    both = key(rpm=2, concurrent=1)
    assert limits.admit(both)
    with pytest.raises(RateLimited):
        limits.admit(both)  # busy
    limits.release(both)
    assert limits.admit(both)  # the second token is still there


def test_keys_are_counted_apart() -> None:
    limits = LocalLimits(Clock())
    limits.admit(key("a", rpm=1))
    limits.admit(key("b", rpm=1))
    with pytest.raises(RateLimited):
        limits.admit(key("a", rpm=1))
