"""Per-key limits: requests per minute (a token bucket) and requests in flight.

State lives in this process. With several uvicorn workers each enforces the limits on its own
share of the traffic, so a key may reach up to N times its limit; run one worker per gateway
replica where limits must be exact (one worker relays thousands of requests per second).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from gateway import waits
from gateway.errors import RateLimited
from gateway.keys import ApiKey


@dataclass(slots=True)
class _Usage:
    tokens: float
    updated: float = field(default_factory=time.monotonic)
    in_flight: int = 0


class KeyLimiter:
    def __init__(self) -> None:
        self._usage: dict[str, _Usage] = {}

    def admit(self, key: ApiKey) -> None:
        """Count one request in, or raise RateLimited with how long to wait."""
        usage = self._usage.get(key.name)
        if usage is None:
            usage = self._usage[key.name] = _Usage(tokens=float(key.requests_per_minute or 0))
        if key.max_concurrent is not None and usage.in_flight >= key.max_concurrent:
            raise RateLimited(
                f"Key {key.name!r} already has {key.max_concurrent} requests in flight, "
                "its limit; retry when one finishes.",
                retry_after=waits.RETRY_CONCURRENCY,
            )
        if key.requests_per_minute is not None:
            rate = key.requests_per_minute / 60.0
            now = time.monotonic()
            usage.tokens = min(
                float(key.requests_per_minute), usage.tokens + (now - usage.updated) * rate
            )
            usage.updated = now
            if usage.tokens < 1.0:
                raise RateLimited(
                    f"Key {key.name!r} is over its limit of "
                    f"{key.requests_per_minute} requests per minute.",
                    retry_after=max(1, math.ceil((1.0 - usage.tokens) / rate)),
                )
            usage.tokens -= 1.0
        usage.in_flight += 1

    def release(self, key: ApiKey) -> None:
        usage = self._usage.get(key.name)
        if usage is not None and usage.in_flight > 0:
            usage.in_flight -= 1
