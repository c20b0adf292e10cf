"""Which limits store a gateway process counts in: Redis when `limits_store` names one, else
the host's shared table when the control plane gave this worker one, else its own memory."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.limits.local import LocalLimits
from gateway.limits.settings import LimitsStoreSettings
from gateway.limits.shared import LIMITS_TABLE_ENV, shared_limits_from
from gateway.limits.store import LimitsStore


def limits_store(settings: LimitsStoreSettings | None, environ: Mapping[str, str]) -> LimitsStore:
    if settings is not None and settings.redis:
        from gateway.limits.redis_store import RedisLimits  # the client, only when used

        return RedisLimits(settings)
    if table := environ.get(LIMITS_TABLE_ENV):
        return shared_limits_from(table)
    return LocalLimits()


def needs_shared_table(settings: LimitsStoreSettings | None) -> bool:
    """For the control plane: whether its workers count in a shared table (not in Redis)."""
    return settings is None or not settings.redis
