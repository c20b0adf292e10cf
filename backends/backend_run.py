"""One spawned server's run, start to end: its GPUs' start-up turn, the start, the wait until
it is ready (health and model list), the KV cache it got, the watch (the process, and /health
every few seconds), and on death or repeated health failures the end of its whole process
tree, the wait until that tree's GPU memory is free, and a restart with exponential backoff,
up to a limit after which the server is failed. Its model's life makes every state move; the
run asks, and stops where the life answers that its server is not to come back.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backends import adapters, adoption, kv_cache, lifecycle, start_checks
from backends.errors import SpawnError
from backends.gpu_turns import GpuTurns
from backends.health import is_healthy, served
from backends.http import client_for
from backends.kept import KeptServers
from backends.kv_endpoints import prepare_socket_dir
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Replica
from backends.process import BackendProcess, free_port
from backends.spec import VllmSpec

log = logging.getLogger("vllm_gateway.supervisor")
HTTP_TIMEOUT = 5.0  # readiness polls and the KV cache read; health checks have their own
SLEEP_STATES = frozenset({BackendState.SLEEPING, BackendState.ASLEEP, BackendState.WAKING})


@dataclass(frozen=True)
class SpawnHealth:
    """How a ready server is watched: /health every ``interval`` seconds; ``failures`` failed
    checks in a row (each given ``timeout`` seconds) restart it."""

    interval: float = 5.0
    timeout: float = 5.0
    failures: int = 3


@dataclass(frozen=True)
class SupervisorTimings:
    startup_timeout: float = 1800.0  # big models take many minutes to load
    poll_interval: float = 1.0  # while loading
    health: SpawnHealth = SpawnHealth()  # per model: `models[].health` in the config
    backoff_base: float = 2.0
    backoff_cap: float = 60.0
    max_restarts: int = 5  # in a row without becoming ready; then the backend is failed
    stop_grace: float = 15.0
    progress_interval: float = 15.0
    gpu_release_timeout: float = 120.0  # for the old tree's GPU memory before a restart
    sleep_timeout: float = 300.0  # one sleep or wake call (level 1 copies weights to host)


@dataclass(eq=False)
class Backend:
    spec: VllmSpec
    replica: Replica
    process: BackendProcess
    health: SpawnHealth
    client: httpx.AsyncClient  # the gateway's own calls to it (TCP, or its unix socket)
    on_demand: bool = False
    task: asyncio.Task[None] | None = None
    became_ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: str = ""  # why its last start failed, with the server's last log lines


class BackendRun:
    """Runs backends' lives; shared by all of a supervisor's backends."""

    def __init__(
        self,
        timings: SupervisorTimings,
        turns: GpuTurns,
        adapter_book: adapters.AdapterBook,
        lives: dict[str, ModelLife],
        gpu_memory: float | None,
        kept: KeptServers,
        connect_timeout: float,
    ) -> None:
        """``kept``: servers a previous gateway left running, taken over instead of started."""
        self.kept = kept
        self.connect_timeout = connect_timeout
        self.timings = timings
        self.turns = turns
        self.adapters = adapter_book
        self.lives = lives
        self.gpu_memory = gpu_memory

    async def __call__(self, backend: Backend) -> None:
        life = self.lives[backend.spec.name]
        failures_in_a_row = 0
        first_life = True
        while True:
            became_ready = await self._start_and_watch(backend)
            pids = await backend.process.stop(self.timings.stop_grace)
            if backend.spec.gpus:
                await start_checks.gpu_memory_freed(
                    backend.spec.label, pids, self.timings.gpu_release_timeout
                )
            failures_in_a_row = 0 if became_ready else failures_in_a_row + 1
            if backend.on_demand and first_life and not became_ready:
                await life.move(BackendState.STOPPED, backend.replica)  # its policy decides
                return
            first_life = False
            if failures_in_a_row > self.timings.max_restarts:
                await life.move(BackendState.FAILED, backend.replica)
                log.error(
                    "%s: failed %d times in a row; giving up. Last log lines (%s):\n  %s",
                    backend.spec.label,
                    failures_in_a_row,
                    backend.process.log_path,
                    "\n  ".join(backend.process.tail()),
                )
                return
            if await life.after_death(backend.replica) is BackendState.STOPPED:
                log.info("%s: not restarted: its model is being unloaded", backend.spec.label)
                return
            backend.replica.restarts += 1
            delay = lifecycle.backoff(
                failures_in_a_row, self.timings.backoff_base, self.timings.backoff_cap
            )
            log.warning(
                "%s: restarting in %.0fs (restart %d)",
                backend.spec.label,
                delay,
                backend.replica.restarts,
            )
            await asyncio.sleep(delay)

    async def _start_and_watch(self, backend: Backend) -> bool:
        """Run one life of the server. True if it became ready before it ended."""
        spec, replica = backend.spec, backend.replica
        life = self.lives[spec.name]
        if not await self._start_in_turn(backend):
            return False
        if replica.state is BackendState.ASLEEP:  # adopted asleep: its model's wake wakes it
            await self._watch(backend)
            return True
        wanted = self.adapters.of(spec.name)
        if wanted:  # before admission: no request may reach it without the adapter it names
            await life.move(BackendState.RESTORING, replica)
            await adapters.restore(backend.client, replica, wanted)
        await life.move(BackendState.READY, replica)
        backend.became_ready.set()
        assert replica.ready_since is not None
        backend.process.tree()  # the engine core and workers exist now: remember them
        log.info(
            "%s: ready after %.0fs", spec.label, replica.ready_since - backend.process.started_at
        )
        if kv_cache.generative(spec):
            await start_checks.check_kv_cache(backend.client, spec, replica, self.gpu_memory)
        await self._watch(backend)
        return True

    async def _start_in_turn(self, backend: Backend) -> bool:
        """Start once no other server on these GPUs is starting; hold the turn until ready,
        failed, or out of start-up time, so this server's memory profiling runs alone."""
        spec, replica, process = backend.spec, backend.replica, backend.process
        life = self.lives[spec.name]
        # A first start loads; a restart stays `restarting` until its new server is ready.
        starting = BackendState.LOADING if replica.state is BackendState.STOPPED else replica.state
        if (adopted := self.kept.take(spec.label)) is not None:
            if not adopted.asleep:
                await life.move(starting, replica)
            return await self._take_over(backend, adopted)
        if self.turns.holders(spec.gpus):
            await life.move(BackendState.WAITING, replica)
        async with self.turns.turn(spec.label, spec.gpus):
            await life.move(starting, replica)
            # "sk-" first: a key starting with "-" would read as a flag to the server's argparse.
            key = "sk-" + secrets.token_urlsafe(24)
            replica.api_key = key
            if replica.uds is not None:
                Path(replica.uds).unlink(missing_ok=True)  # a dead server's socket file
                command, where = spec.command(0, uds=replica.uds), replica.uds
            else:
                port = free_port()
                replica.url = f"http://127.0.0.1:{port}"
                command, where = spec.command(port), f"port {port}"
            env = spec.environment(api_key=key)  # by environment: `ps` shows a command line
            keep = self.kept.keep_backends
            try:
                prepare_socket_dir(spec)
            except SpawnError as exc:
                log.error("%s: not started: %s", spec.label, exc)
                return False
            await process.start(command, env, self.timings.stop_grace, keep)
            self.kept.record(spec, replica, process)
            log.info("%s: starting on %s (pid %s)", spec.label, where, process.pid)
            return await self._wait_ready(backend)

    async def _wait_ready(self, backend: Backend) -> bool:
        spec, replica, process = backend.spec, backend.replica, backend.process
        deadline = time.monotonic() + self.timings.startup_timeout
        while time.monotonic() < deadline:
            if not process.alive:
                lines = process.tail()
                backend.last_error = f"{spec.label} exited with code {process.returncode}: " + (
                    lines[-1] if lines else "(no output)"
                )
                log.error(
                    "%s: exited with code %s while loading. Last log lines (%s):\n  %s",
                    spec.label,
                    process.returncode,
                    process.log_path,
                    "\n  ".join(lines),
                )
                return False
            found = await served(backend.client, replica.url, spec.name, replica.api_key)
            if found is not None:
                replica.adapters = found
                return True
            await asyncio.sleep(self.timings.poll_interval)
        backend.last_error = f"{spec.label} not ready after {self.timings.startup_timeout:.0f}s"
        log.error("%s", backend.last_error)
        return False

    async def _watch(self, backend: Backend) -> None:
        """Return when the process died or failed its health check too often in a row."""
        spec, replica, process = backend.spec, backend.replica, backend.process
        failures = 0
        exited = asyncio.ensure_future(process.wait())
        try:
            checks = backend.health
            while failures < checks.failures:
                done, _ = await asyncio.wait({exited}, timeout=checks.interval)
                if done:
                    await self.lives[spec.name].move(BackendState.RESTARTING, replica)
                    log.error(
                        "%s: exited with code %s. Last log lines:\n  %s",
                        spec.label,
                        process.returncode,
                        "\n  ".join(process.tail(10)),
                    )
                    return
                if replica.state in SLEEP_STATES:
                    continue  # a sleeping server is watched for death only
                began = time.monotonic()
                try:
                    async with asyncio.timeout(checks.timeout):
                        healthy = await is_healthy(backend.client, replica.url)
                except TimeoutError:
                    healthy = False
                replica.health_latency = time.monotonic() - began
                failures = 0 if healthy else failures + 1
            await self.lives[spec.name].move(BackendState.RESTARTING, replica)
            log.error("%s: failed %d health checks in a row", spec.label, failures)
        finally:
            exited.cancel()

    async def _take_over(self, backend: Backend, adopted: adoption.Adopted) -> bool:
        """Kept servers: make an adopted server this backend's, as a start that just
        answered ready (its adapters restored and its KV cache read next, as for any), or,
        asleep, as a server that just fell asleep."""
        record, replica = adopted.record, backend.replica
        replica.api_key, replica.adapters = record.api_key, adopted.adapters
        if record.uds is not None:
            replica.uds = record.uds
            await backend.client.aclose()
            timeout = httpx.Timeout(HTTP_TIMEOUT, connect=self.connect_timeout)
            backend.client = client_for(replica, timeout)
        else:
            replica.url = record.url
        try:
            backend.process.adopt(record.pgid)
        except ProcessLookupError:
            backend.last_error = f"{backend.spec.label}: the adopted server ended meanwhile"
            return False
        where = record.uds or f"port {record.port}"
        log.info("%s: adopted the server on %s (pid %d)", backend.spec.label, where, record.pgid)
        if adopted.asleep:
            await self.lives[backend.spec.name].move(BackendState.ASLEEP, replica)
        return True
