"""Per-key limits in a worker process: the one seam where the limits store plugs in.

With `limits_store` naming a Redis, each worker counts there, as one gateway process would
(``gateway.limits.build.limits_store``), and so do the other replicas. Otherwise the workers
of one host count in one table in shared memory (``gateway.limits.shared``): the control
plane creates it before the first worker starts (``host_table``), each worker inherits its
descriptor and attaches as its own column (``worker_key_limiter``), and a worker's column is
zeroed once it died, before its successor starts (``SharedTable.forget_worker``), which
gives back the `max_concurrent` slots its requests held. The table comes by the worker's
command line, never by the environment, so no process attaches by accident to a table that
was meant for another.
"""

from __future__ import annotations

from gateway.limits.build import limits_store, needs_shared_table
from gateway.limits.shared import SharedTable, attach_shared_table, create_shared_table
from gateway.limits.store import LimitsStore
from gateway.settings import GatewaySettings


def host_table(settings: GatewaySettings) -> SharedTable | None:
    """For the control plane: the table its workers count in; None when they count in Redis."""
    if not needs_shared_table(settings.limits_store):
        return None
    return create_shared_table(workers=settings.workers)


def worker_key_limiter(settings: GatewaySettings, row: int, table: str | None) -> LimitsStore:
    """The limits store of worker ``row``: Redis when the config names one, else its column
    of the host's table at ``table`` (``SharedTable.where``; None: none was made, so this
    worker counts alone)."""
    if table is not None and needs_shared_table(settings.limits_store):
        return attach_shared_table(table, row)
    return limits_store(settings.limits_store, {})
