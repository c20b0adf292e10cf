"""`serve` with `workers: N` above 1: the control plane's process, and each worker's.

The control plane runs the whole gateway app (``gateway.app.create_app``: the supervisor,
health checks, on-demand models, reload, the control API) on a private unix socket that only
its workers reach, and beside it the ``Plane`` and the worker processes. Its workers serve the
configured address. Everything they share lives in one private directory (mode 0700: the two
sockets) and two anonymous memory files (the in-flight table, and the per-key limits table
unless they are counted in Redis: ``gateway.workers.limits``), gone with the gateway.
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn

from gateway.server import tune_gc, uvicorn_config
from gateway.settings import GatewaySettings
from gateway.workers.counters import InFlightTable
from gateway.workers.limits import host_table
from gateway.workers.listener import bound, reserve
from gateway.workers.worker import Worker

if TYPE_CHECKING:
    from gateway.reload import Reloader
    from gateway.runtime import Runtime
    from gateway.workers.plane import Plane

log = logging.getLogger("uvicorn.error")
SLOTS = 4096  # replicas the in-flight table can count at once (slots are reused)
STOP_GRACE = 40.0  # seconds a worker has to finish its requests (uvicorn's 30 and some)


def serve_control_plane(
    settings: GatewaySettings, config_path: str, overrides: Mapping[str, Any]
) -> int:
    """Run the gateway with ``settings.workers`` workers until it is stopped."""
    # Here, not at the top: a worker's process imports this module too, and needs none of it.
    from gateway.app import Beside, create_app
    from gateway.workers.plane import Plane
    from gateway.workers.processes import RestartCollector, WorkerProcesses

    try:
        holder, port = reserve(settings.host, settings.port)
    except OSError as exc:  # as uvicorn says it for one process
        print(f"error: cannot listen on {settings.host}:{settings.port}: {exc}", file=sys.stderr)
        return 1
    private = Path(tempfile.mkdtemp(prefix="vllm-gateway-"))
    table = InFlightTable.create(settings.workers, SLOTS)
    limits = host_table(settings)
    inherited = [table.fd, *(limits.pass_fds if limits is not None else ())]
    worker_overrides = {**overrides, "port": port}

    def command(plane: Plane, row: int) -> list[str]:
        generation, config = plane.config_file()
        return [
            sys.executable,
            "-m",
            "gateway",
            "worker",
            "--config",
            str(config),
            "--generation",
            str(generation),
            "--row",
            str(row),
            "--table",
            f"{table.fd}:{table.rows}:{table.slots}",
            "--dir",
            str(private),
            "--overrides",
            json.dumps(worker_overrides),
            *(["--limits-table", limits.where] if limits is not None else []),
        ]

    @asynccontextmanager
    async def workers(runtime: Runtime, reloader: Reloader) -> AsyncIterator[None]:
        plane = Plane(
            runtime,
            table,
            private,
            reloaded=reloader.applied,
            generation=lambda: reloader.generation,
            limits=limits,
        )
        await plane.start()
        processes = WorkerProcesses(
            settings.workers,
            partial(command, plane),
            inherited,
            plane.worker_exited,
            probe=plane.answers,
        )
        registry = runtime.telemetry.metrics.registry
        registry.register(restarts := RestartCollector(processes))
        processes.start()
        try:
            yield
        finally:
            await processes.stop(STOP_GRACE)
            await plane.stop()
            registry.unregister(restarts)

    beside: Beside = workers
    try:
        app = create_app(settings, config_path=config_path, overrides=overrides, beside=beside)
        tune_gc()
        config = uvicorn_config(app, settings, uds=str(private / "control.sock"))
        uvicorn.Server(config).run()
    finally:
        holder.close()
        table.close()
        if limits is not None:
            limits.close()
        shutil.rmtree(private, ignore_errors=True)
    return 0


class WorkerServer(uvicorn.Server):
    """uvicorn, which says nothing once it listens on sockets it was given: this says it, as
    it would on its own (the line people and scripts wait for), with the worker's row."""

    def __init__(self, config: uvicorn.Config, row: int) -> None:
        super().__init__(config)
        self.row = row

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            config = self.config
            host = f"[{config.host}]" if ":" in config.host else config.host
            log.info("Uvicorn running on http://%s:%d (worker %d)", host, config.port, self.row)


def serve_worker(
    settings: GatewaySettings,
    *,
    row: int,
    table: str,
    private_dir: str,
    generation: int,
    overrides: Mapping[str, Any],
    limits_table: str | None = None,
) -> int:
    """One worker, until its control plane stops it (or goes away); ``limits_table``: the
    per-key limits table it inherited (``SharedTable.where``)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the control plane's to make
    fd, rows, slots = (int(part) for part in table.split(":"))
    worker = Worker(
        settings,
        row=row,
        table=InFlightTable(fd, rows, slots),
        private_dir=Path(private_dir),
        generation=generation,
        overrides=overrides,
        limits_table=limits_table,
    )
    sock = bound(settings.host, settings.port)
    server = WorkerServer(uvicorn_config(worker, settings), row)

    def lost() -> None:
        server.should_exit = True

    worker.lost = lost
    tune_gc()
    server.run(sockets=[sock])
    return 0
