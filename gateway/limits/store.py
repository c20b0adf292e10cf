"""What every limits store does, and the arithmetic they share.

A store counts a key's requests per minute (a token bucket: `requests_per_minute` tokens at
most, refilled at `requests_per_minute` a minute) and, for keys with `max_concurrent`, its
requests in flight. ``admit`` takes a token and a slot or raises ``RateLimited``; it answers
whether a slot was taken, which the caller gives back with ``release`` once the request ends.
A store across the network (``remote``) is asked with ``ask``, awaited; the others answer
``admit`` at once, with no await on the hot path. The Redis store's Lua script does this same
arithmetic (``gateway.limits.redis_scripts``).
"""

from __future__ import annotations

import math

from prometheus_client.registry import Collector

from gateway import waits
from gateway.errors import RateLimited
from gateway.keys import ApiKey


class LimitsStore:
    remote = False  # admit must be asked across the network: ``await ask(key)``

    def admit(self, key: ApiKey) -> bool:
        """Count one request in, or raise RateLimited; True: a slot is held until
        ``release``."""
        raise NotImplementedError

    async def ask(self, key: ApiKey) -> bool:
        return self.admit(key)

    def release(self, key: ApiKey) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """With the gateway's lifespan (a remote store connects here)."""

    async def close(self) -> None:
        pass

    def collector(self) -> Collector | None:
        """Its series for /metrics, if it has any."""
        return None


def refilled(tokens: float, elapsed: float, rpm: int) -> float:
    """The bucket ``elapsed`` seconds later: full at ``rpm`` tokens."""
    return min(float(rpm), tokens + max(0.0, elapsed) * rpm / 60.0)


def over_rate(key: ApiKey, tokens: float) -> RateLimited:
    """Refused by the bucket: Retry-After is when its next token comes."""
    rpm = key.requests_per_minute or 1
    wait = (1.0 - tokens) * 60.0 / rpm
    return RateLimited(
        f"Key {key.name!r} is over its limit of {rpm} requests per minute.",
        retry_after=max(1, math.ceil(wait - 1e-9)),
    )


def over_concurrency(key: ApiKey) -> RateLimited:
    return RateLimited(
        f"Key {key.name!r} already has {key.max_concurrent} requests in flight, "
        "its limit; retry when one finishes.",
        retry_after=waits.RETRY_CONCURRENCY,
    )
