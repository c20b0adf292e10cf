"""Start, watch and restart the vLLM servers of spawn mode; stop them all on the way out.

One asyncio task per backend runs its life: wait for its GPUs' start-up turn, start, wait
until ready (health and model list), check the KV cache it got, watch (the process, and
/health every few seconds), and on death or repeated health failures end its whole process
tree, wait until the GPU memory of that tree is free, and restart with exponential backoff, up
to a limit after which the backend is marked failed. The replica object it owns is what the
gateway routes by: its ``state`` and ``url`` are updated here, so requests see a loading or
restarting model at once and get a clean 503.

On-demand models (``backends.on_demand``) are not started with the others: their owner calls
``load``, ``drain`` and ``unload``. A first start that fails ends there (the owner decides
what comes next); a server that dies once ready is restarted as any other.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from backends import adapters, kv_cache, lifecycle, sleep_mode, start_checks
from backends.gpu_turns import GpuTurns
from backends.health import is_healthy, served
from backends.http import client_for
from backends.lifecycle import BackendState
from backends.on_demand import LoadFailed
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


class Supervisor:
    def __init__(
        self,
        specs: Iterable[VllmSpec],
        *,
        log_dir: str | Path = "logs",
        timings: SupervisorTimings | None = None,
        gpu_memory: float | None = None,
        health: Mapping[str, SpawnHealth] | None = None,
        on_demand: Collection[str] = (),
        adapter_book: adapters.AdapterBook | None = None,
    ) -> None:
        """``gpu_memory``: bytes per GPU, for the KV cache a slice should give; ``health``:
        per model name, where it differs from ``timings.health``; ``on_demand``: the models
        started by ``load`` rather than by ``start``; ``adapter_book``: runtime LoRA adapters,
        given to each server before it is admitted."""
        self.timings = timings or SupervisorTimings()
        self.turns = GpuTurns()
        self.adapters = adapter_book or adapters.AdapterBook()  # runtime LoRA, restored on start
        self.gpu_memory = gpu_memory
        self.backends: dict[str, Backend] = {}
        self._sockets: Path | None = None  # a directory only this user may enter
        for index, spec in enumerate(specs):
            replica = Replica(
                url="",
                state=BackendState.STOPPED,
                gpus=tuple(spec.gpus),
                identity=str(spec.replica or 0),  # its port changes when it restarts
            )
            if spec.unix_socket:
                replica.url, replica.uds = f"http://backend-{index}", str(self._socket(index))
            process = BackendProcess(spec.label, Path(log_dir) / f"{spec.label}.log")
            checks = (health or {}).get(spec.name, self.timings.health)
            client = client_for(replica, httpx.Timeout(HTTP_TIMEOUT))
            self.backends[spec.label] = Backend(
                spec, replica, process, checks, client, on_demand=spec.name in on_demand
            )
        self._progress: asyncio.Task[None] | None = None

    def _socket(self, index: int) -> Path:
        """A socket path in a directory made for this gateway, mode 0700: vLLM's dev endpoints
        (sleep mode) take no key, so nobody else may reach the server at all."""
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="vllm-gateway-"))
        return self._sockets / f"{index}.sock"

    def replicas(self, name: str) -> list[Replica]:
        return [b.replica for b in self.backends.values() if b.spec.name == name]

    async def start(self) -> None:
        if not self.backends:
            return
        for backend in self.backends.values():
            if not backend.on_demand:
                self._launch(backend)
        servers = [(b.spec, b.replica, b.process) for b in self.backends.values()]
        self._progress = asyncio.create_task(
            start_checks.report_progress(servers, self.turns, self.timings.progress_interval)
        )

    def _launch(self, backend: Backend) -> None:
        backend.became_ready.clear()
        backend.last_error = ""
        backend.task = asyncio.create_task(self._run(backend), name=f"backend:{backend.spec.label}")

    def _of(self, name: str) -> list[Backend]:
        return [b for b in self.backends.values() if b.spec.name == name]

    async def load(self, name: str) -> None:
        """Start the servers of an on-demand model; return once one is ready. LoadFailed when
        every one failed its first start."""
        backends = self._of(name)
        for backend in backends:
            if backend.task is None or backend.task.done():
                self._launch(backend)
        while True:
            if any(b.became_ready.is_set() for b in backends):
                return
            running = [b.task for b in backends if b.task is not None and not b.task.done()]
            if not running:
                raise LoadFailed("; ".join(b.last_error for b in backends if b.last_error))
            waits = [asyncio.ensure_future(b.became_ready.wait()) for b in backends]
            try:
                await asyncio.wait([*running, *waits], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()

    def drain(self, name: str) -> None:
        """Ready servers of the model take no new requests; the ones in flight go on."""
        for backend in self._of(name):
            if backend.replica.state is BackendState.READY:
                backend.replica.move(BackendState.DRAINING)

    async def unload(self, name: str) -> None:
        """End the model's servers and wait until their GPU memory is free."""
        backends = self._of(name)
        tasks = [b.task for b in backends if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._end(b) for b in backends))

    async def sleep(self, name: str, level: int) -> None:
        """Put the model's drained servers to sleep (``backends.sleep_mode``); SleepModeError
        if one does not fall asleep (its owner then stops it)."""
        for backend in self._of(name):
            replica = backend.replica
            if replica.state is not BackendState.DRAINING:
                continue
            replica.move(BackendState.SLEEPING)
            began = time.monotonic()
            await sleep_mode.put_to_sleep(
                backend.client, replica.url, level, self.timings.sleep_timeout
            )
            replica.move(BackendState.ASLEEP)
            backend.became_ready.clear()
            log.info(
                "%s: asleep (level %d) after %.2fs",
                backend.spec.label,
                level,
                time.monotonic() - began,
            )

    async def wake(self, name: str, level: int) -> None:
        """Wake the model's sleeping servers, each in its GPU turn (a wake allocates the KV
        cache again, as a start does). SleepModeError if one does not wake."""
        for backend in self._of(name):
            spec, replica = backend.spec, backend.replica
            if replica.state is not BackendState.ASLEEP:
                continue
            replica.move(BackendState.WAKING)
            async with self.turns.turn(spec.label, spec.gpus):
                began = time.monotonic()
                await sleep_mode.wake_up(
                    backend.client, replica.url, level, self.timings.sleep_timeout
                )
            # Still not admitted: what it serves now, and any runtime adapter it lost asleep.
            found = await served(backend.client, replica.url, spec.name, replica.api_key)
            replica.adapters = found if found is not None else replica.adapters
            if wanted := self.adapters.of(spec.name):
                await adapters.restore(backend.client, replica, wanted)
            replica.move(BackendState.READY)
            backend.became_ready.set()
            log.info("%s: awake after %.2fs", spec.label, time.monotonic() - began)

    async def _end(self, backend: Backend) -> None:
        pids = await backend.process.stop(self.timings.stop_grace)
        if backend.spec.gpus and pids:
            await start_checks.gpu_memory_freed(
                backend.spec.label, pids, self.timings.gpu_release_timeout
            )
        backend.replica.move(BackendState.STOPPED)
        backend.became_ready.clear()

    async def stop(self) -> None:
        tasks = [b.task for b in self.backends.values() if b.task is not None]
        if self._progress is not None:
            tasks.append(self._progress)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(b.process.stop(self.timings.stop_grace) for b in self.backends.values())
        )
        for backend in self.backends.values():
            backend.replica.move(BackendState.STOPPED)
        await asyncio.gather(*(b.client.aclose() for b in self.backends.values()))
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)

    async def _run(self, backend: Backend) -> None:
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
                backend.replica.move(BackendState.STOPPED)  # a first start: its owner decides
                return
            first_life = False
            if failures_in_a_row > self.timings.max_restarts:
                backend.replica.move(BackendState.FAILED)
                log.error(
                    "%s: failed %d times in a row; giving up. Last log lines (%s):\n  %s",
                    backend.spec.label,
                    failures_in_a_row,
                    backend.process.log_path,
                    "\n  ".join(backend.process.tail()),
                )
                return
            backend.replica.restarts += 1
            backend.replica.move(BackendState.RESTARTING)
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
        if not await self._start_in_turn(backend):
            return False
        wanted = self.adapters.of(spec.name)
        if wanted:  # before admission: no request may reach it without the adapter it names
            replica.move(BackendState.RESTORING)
            await adapters.restore(backend.client, replica, wanted)
        replica.move(BackendState.READY)
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
        # A first start loads; a restart stays `restarting` until its new server is ready.
        starting = BackendState.LOADING if replica.state is BackendState.STOPPED else replica.state
        if self.turns.holders(spec.gpus):
            replica.move(BackendState.WAITING)
        async with self.turns.turn(spec.label, spec.gpus):
            replica.move(starting)
            # "sk-" first: a key starting with "-" would read as a flag to the server's argparse.
            key = "sk-" + secrets.token_urlsafe(24)
            replica.api_key = key
            if replica.uds is not None:
                Path(replica.uds).unlink(missing_ok=True)  # a dead server's socket file
                command, where = spec.command(0, key, uds=replica.uds), replica.uds
            else:
                port = free_port()
                replica.url = f"http://127.0.0.1:{port}"
                command, where = spec.command(port, key), f"port {port}"
            await process.start(command, spec.environment(), self.timings.stop_grace)
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
                    replica.move(BackendState.RESTARTING)
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
            replica.move(BackendState.RESTARTING)
            log.error("%s: failed %d health checks in a row", spec.label, failures)
        finally:
            exited.cancel()
