"""A control plane and two workers on one event loop, as the tests of this package use them:
the real ``Plane`` and ``Worker`` over real unix-socket channels, the per-key limits table
the control plane makes for them, backends in-process (``gateway.inprocess``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from backends.discovery import resolve
from gateway.app import build_runtime
from gateway.inprocess import Handler, InProcessUpstreams, Reply, Sent
from gateway.runtime import Runtime
from gateway.workers.counters import InFlightTable
from gateway.workers.limits import host_table
from gateway.workers.plane import Plane
from gateway.workers.worker import Worker
from tests.servers import gateway_settings

URLS = ["http://a", "http://b"]


async def answer(sent: Sent) -> Reply:
    return Reply.json({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}})


class Gateway:
    def __init__(self, tmp: Path, runtime: Runtime, plane: Plane, workers: list[Worker]):
        self.tmp, self.runtime, self.plane, self.workers = tmp, runtime, plane, workers

    @property
    def replicas(self) -> list[object]:
        return list(self.runtime.pools[0].replicas)


@asynccontextmanager
async def two_workers(
    tmp_path: Path,
    model: Mapping[str, object],
    handler: Handler = answer,
    **extra: Any,
) -> AsyncIterator[Gateway]:
    """A control plane and two workers of model `m` (``model``: more of its settings;
    ``handler``: its replicas' answers; ``extra``: more of the gateway's settings)."""
    models = [{"name": "m", "urls": URLS, **model}]
    settings = gateway_settings(models, log_dir=str(tmp_path), workers=2, **extra)
    runtime = build_runtime(settings, None, resolve)
    table = InFlightTable.create(rows=2, slots=16)
    limits = host_table(settings)
    plane = Plane(runtime, table, tmp_path, limits=limits)
    await plane.start()
    workers = []
    try:
        async with AsyncExitStack() as stack:
            for row in range(2):
                worker = Worker(
                    settings,
                    row=row,
                    table=InFlightTable(os.dup(table.fd), 2, 16),
                    private_dir=tmp_path,
                    generation=1,
                    overrides={},
                    limits_table=limits.where if limits is not None else None,
                )
                worker.relay.upstreams = InProcessUpstreams({url: handler for url in URLS})
                await stack.enter_async_context(worker.lifespan())
                workers.append(worker)
            yield Gateway(tmp_path, runtime, plane, workers)
    finally:
        await plane.stop()
        if limits is not None:
            limits.close()
