"""Limits counted in this process: the default, and the cheapest (a dict lookup and a little
arithmetic per request). Exact for one process; the workers of one host share a table instead
(``gateway.limits.shared``), and replicas share Redis (``gateway.limits.redis_store``)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.keys import ApiKey
from gateway.limits.store import LimitsStore, over_concurrency, over_rate, refilled


@dataclass(slots=True)
class _Usage:
    updated: float
    tokens: float = math.inf  # a full bucket, whatever the key's limit is when first used
    in_flight: int = 0


class LocalLimits(LimitsStore):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._usage: dict[str, _Usage] = {}
        self._clock = clock

    def admit(self, key: ApiKey) -> bool:
        usage = self._usage.get(key.name)
        if usage is None:
            usage = self._usage[key.name] = _Usage(self._clock())
        limit = key.max_concurrent
        if limit is not None and usage.in_flight >= limit:
            raise over_concurrency(key)
        if (rpm := key.requests_per_minute) is not None:
            now = self._clock()
            usage.tokens = refilled(usage.tokens, now - usage.updated, rpm)
            usage.updated = now
            if usage.tokens < 1.0:
                raise over_rate(key, usage.tokens)
            usage.tokens -= 1.0
        if limit is None:
            return False
        usage.in_flight += 1
        return True

    def release(self, key: ApiKey) -> None:
        usage = self._usage.get(key.name)
        if usage is not None and usage.in_flight > 0:
            usage.in_flight -= 1

    def in_flight(self, key: ApiKey) -> int:
        usage = self._usage.get(key.name)
        return usage.in_flight if usage is not None else 0
