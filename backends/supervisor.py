"""The vLLM servers of spawn mode: which there are, and what the gateway asks of them.

Each server's run (``backends.backend_run``: start in its GPU turn, wait until ready, watch,
restart) is a task of its own; the supervisor starts those tasks with the gateway, and for
on-demand models when their policy calls ``load``, ``drain``, ``sleep``, ``wake`` or
``unload`` (``backends.on_demand``); a reload adds, removes and restarts models here
(``add``, ``remove``, ``restart``). It writes no state itself: each model's life
(``backends.life``) makes the moves it asks for. The replicas are what the gateway routes by,
so requests see a loading or restarting model at once and get a clean 503. On the way out it
stops every server.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

import httpx

from backends import adapters, sleep_mode, start_checks
from backends.backend_run import (
    HTTP_TIMEOUT,
    Backend,
    BackendRun,
    SpawnHealth,
    SupervisorTimings,
)
from backends.errors import LoadFailed
from backends.gpu_turns import GpuTurns
from backends.health import served
from backends.http import client_for
from backends.kept import KeptServers, Resumed
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Replica
from backends.process import BackendProcess
from backends.spec import VllmSpec
from backends.state_dir import StateDir

__all__ = ["Backend", "SpawnHealth", "Supervisor", "SupervisorTimings"]
log = logging.getLogger("vllm_gateway.supervisor")


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
        connect_timeout: float = HTTP_TIMEOUT,
        state_dir: StateDir | None = None,
        keep_backends: float = 0.0,
    ) -> None:
        """``gpu_memory``: bytes per GPU, for the KV cache a slice should give; ``health``:
        per model name, where it differs from ``timings.health``; ``on_demand``: the models
        started by ``load`` rather than by ``start``; ``adapter_book``: runtime LoRA adapters,
        given to each server before it is admitted; ``connect_timeout``: seconds to open a
        connection to a server, for every call the gateway makes to it; ``state_dir``: where
        every start is recorded, for the next gateway to adopt; ``keep_backends``: seconds the
        servers wait for it (0: they stop with this gateway)."""
        self.timings = timings or SupervisorTimings()
        self.kept = KeptServers(state_dir, keep_backends, self.timings.stop_grace)
        self.turns = GpuTurns()
        self.adapters = adapter_book or adapters.AdapterBook()  # runtime LoRA, restored on start
        self.gpu_memory = gpu_memory
        self.connect_timeout = connect_timeout
        self.backends: dict[str, Backend] = {}
        self.lives: dict[str, ModelLife] = {}  # model name -> the one writer of its states
        self._run = BackendRun(
            self.timings,
            self.turns,
            self.adapters,
            self.lives,
            gpu_memory,
            self.kept,
            connect_timeout,
        )
        self.log_dir = Path(log_dir)
        self._health = dict(health or {})
        self._sockets: Path | None = None  # a directory only this user may enter
        self._servers_made = 0  # numbers each server's socket
        for spec in specs:
            self._add_backend(spec, spec.name in on_demand)
        self._progress: asyncio.Task[None] | None = None

    def _add_backend(self, spec: VllmSpec, on_demand: bool) -> Backend:
        replica = Replica(
            url="",
            state=BackendState.STOPPED,
            gpus=tuple(spec.gpus),
            identity=str(spec.replica or 0),  # its port changes when it restarts
            share=spec.memory_share,
        )
        if spec.name not in self.lives:
            self.lives[spec.name] = ModelLife(spec.name, on_demand=on_demand)
        self.lives[spec.name].replicas.append(replica)
        if spec.unix_socket:
            index = self._servers_made
            replica.url, replica.uds = f"http://backend-{index}", str(self._socket(index))
        self._servers_made += 1
        process = BackendProcess(spec.label, self.log_dir / f"{spec.label}.log")
        checks = self._health.get(spec.name, self.timings.health)
        client = client_for(replica, httpx.Timeout(HTTP_TIMEOUT, connect=self.connect_timeout))
        backend = Backend(spec, replica, process, checks, client, on_demand=on_demand)
        self.backends[spec.label] = backend
        return backend

    def _socket(self, index: int) -> Path:
        """A socket path in a directory made for this gateway, mode 0700: vLLM's dev endpoints
        (sleep mode) take no key, so nobody else may reach the server at all."""
        if self._sockets is None:
            self._sockets = Path(tempfile.mkdtemp(prefix="vllm-gateway-"))
        return self._sockets / f"{index}.sock"

    def backend_of(self, replica: Replica) -> Backend | None:
        """The server behind ``replica``, if it is one of this supervisor's."""
        return next((b for b in self.backends.values() if b.replica is replica), None)

    def replicas(self, name: str) -> list[Replica]:
        return self.lives[name].replicas if name in self.lives else []

    def life(self, name: str) -> ModelLife:
        return self.lives[name]

    async def start(self) -> None:
        await self.kept.sort({label: (b.spec, b.on_demand) for label, b in self.backends.items()})
        if not self.backends:
            return
        for backend in self.backends.values():
            if not backend.on_demand or self.kept.has(backend.spec.label):
                self._launch(backend)  # an on-demand one: to take over what the last one left
        servers = [(b.spec, b.replica, b.process) for b in self.backends.values()]
        self._progress = asyncio.create_task(
            start_checks.report_progress(servers, self.turns, self.timings.progress_interval)
        )

    async def resumed(self, name: str) -> Resumed | None:
        """What the adopted servers of on-demand model ``name`` do once taken over: serve, or
        sleep (at the level recorded when they fell asleep, 0 if none was); None when none was
        adopted (or none survived the take-over), so the model stays stopped."""
        life, adopted = self.lives[name], [b for b in self._of(name) if b.task is not None]
        settled = (BackendState.READY, BackendState.ASLEEP)

        def taken(backend: Backend) -> bool:
            assert backend.task is not None
            return backend.replica.state in settled or backend.task.done()

        while not all(taken(b) for b in adopted):
            tasks = [b.task for b in adopted if b.task is not None and not b.task.done()]
            # until() checks and waits in one step: a move between the two is not missed.
            moved = asyncio.ensure_future(life.until(lambda: all(taken(b) for b in adopted)))
            try:
                await asyncio.wait([*tasks, moved], return_when=asyncio.FIRST_COMPLETED)
            finally:
                moved.cancel()
        states = {b.replica.state for b in adopted}
        if BackendState.READY in states:
            return Resumed(asleep=False)
        if BackendState.ASLEEP in states:
            levels = [self.kept.level(b.spec.label) for b in adopted]
            return Resumed(asleep=True, level=max(levels))
        return None

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

    async def drain(self, name: str) -> None:
        """Ready servers of the model take no new requests; the ones in flight go on."""
        life = self.lives[name]
        for backend in self._of(name):
            await life.move(BackendState.DRAINING, backend.replica, expected={BackendState.READY})

    async def unload(self, name: str) -> None:
        """End the model's servers and wait until their GPU memory is free."""
        backends = self._of(name)
        tasks = [b.task for b in backends if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(self._end(b) for b in backends))

    async def sleep(self, name: str, level: int) -> int:
        """Put the model's drained servers to sleep (``backends.sleep_mode``); how many sleep
        now (a server that died while draining is stopped, not asleep). SleepModeError if one
        does not fall asleep (its policy then stops the model)."""
        life, asleep = self.lives[name], 0
        for backend in self._of(name):
            replica = backend.replica
            drained = {BackendState.DRAINING}
            if await life.move(BackendState.SLEEPING, replica, expected=drained) is not (
                BackendState.SLEEPING
            ):
                continue
            began = time.monotonic()
            await sleep_mode.put_to_sleep(
                backend.client, replica.url, level, self.timings.sleep_timeout
            )
            sleeping = {BackendState.SLEEPING}
            if await life.move(BackendState.ASLEEP, replica, expected=sleeping) is not (
                BackendState.ASLEEP
            ):
                continue  # it died in its sleep: its watcher and its life took care of it
            asleep += 1
            backend.became_ready.clear()
            self.kept.slept(backend.spec.label, level)
            log.info(
                "%s: asleep (level %d) after %.2fs",
                backend.spec.label,
                level,
                time.monotonic() - began,
            )
        return asleep

    async def wake(self, name: str, level: int) -> None:
        """Wake the model's sleeping servers, each in its GPU turn (a wake allocates the KV
        cache again, as a start does), and start again the ones that died while it was being
        unloaded; return once one serves. SleepModeError if one does not wake."""
        life, woke = self.lives[name], False
        for backend in self._of(name):
            if backend.replica.state is BackendState.STOPPED:
                self._launch(backend)  # died asleep or draining: it starts afresh
        for backend in self._of(name):
            spec, replica = backend.spec, backend.replica
            if (
                await life.move(BackendState.WAKING, replica, expected={BackendState.ASLEEP})
                is not BackendState.WAKING
            ):
                continue
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
            if (
                await life.move(BackendState.READY, replica, expected={BackendState.WAKING})
                is BackendState.READY
            ):
                woke = True
                backend.became_ready.set()
                self.kept.slept(spec.label, 0)
                log.info("%s: awake after %.2fs", spec.label, time.monotonic() - began)
        if not woke:
            await self.load(name)  # nothing was asleep: the servers started above must serve

    # Changes a reload makes (``gateway.reload``): a model added, removed, or restarted.

    async def add(
        self, specs: Iterable[VllmSpec], *, on_demand: bool, health: SpawnHealth | None = None
    ) -> ModelLife:
        """A model a reload added: its servers start now, unless it starts on demand."""
        specs = list(specs)
        name = specs[0].name
        if health is not None:
            self._health[name] = health
        added = [self._add_backend(spec, on_demand) for spec in specs]
        if not on_demand:
            for backend in added:
                self._launch(backend)
        return self.lives[name]

    async def remove(self, name: str) -> None:
        """A model a reload removed, once its requests drained: its servers end, and it is
        forgotten."""
        await self.unload(name)
        for backend in self._of(name):
            del self.backends[backend.spec.label]
            await backend.client.aclose()
        life = self.lives.pop(name, None)
        if life is not None:
            await life.close()

    async def restart(self, name: str, specs: Iterable[VllmSpec], drain_timeout: float) -> None:
        """Start the model's servers again with ``specs``, one at a time: each is drained
        (``drain_timeout``), stopped, and started anew, and the next goes once it is ready,
        so a model of several replicas never stops serving. Servers the new specs no longer
        have are drained and ended; new ones start beside the others."""
        life, old, new = self.lives[name], self._of(name), list(specs)
        for backend, spec in zip(old, new, strict=False):
            if backend.spec == spec:
                continue
            await self._drain_one(life, backend, drain_timeout)
            backend.spec = spec
            backend.replica.gpus, backend.replica.share = tuple(spec.gpus), spec.memory_share
            if backend.on_demand and life.state is not BackendState.READY:
                continue  # stopped, asleep or starting: it starts with its new command next time
            self._launch(backend)
            await self._ready_or_gone(backend)
        for backend in old[len(new) :]:
            await self._drain_one(life, backend, drain_timeout)
            del self.backends[backend.spec.label]
            await life.remove(backend.replica)
        for spec in new[len(old) :]:
            backend = self._add_backend(spec, old[0].on_demand if old else False)
            if not backend.on_demand or life.state is BackendState.READY:
                self._launch(backend)

    async def _drain_one(self, life: ModelLife, backend: Backend, drain_timeout: float) -> None:
        ready = {BackendState.READY}
        await life.move(BackendState.DRAINING, backend.replica, expected=ready)
        if not await life.drained([backend.replica], drain_timeout):
            log.warning(
                "%s: cutting %d requests still in flight after %gs (drain_timeout)",
                backend.spec.label,
                backend.replica.in_flight,
                drain_timeout,
            )
        if backend.task is not None:
            backend.task.cancel()
            await asyncio.gather(backend.task, return_exceptions=True)
        await self._end(backend)

    async def _ready_or_gone(self, backend: Backend) -> None:
        """Until the server is ready, or its task ended (it failed for good)."""
        task = backend.task
        assert task is not None
        ready = asyncio.ensure_future(backend.became_ready.wait())
        try:
            await asyncio.wait([ready, task], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()

    async def _end(self, backend: Backend) -> None:
        pids = await backend.process.stop(self.timings.stop_grace)
        if backend.spec.gpus and pids:
            await start_checks.gpu_memory_freed(
                backend.spec.label, pids, self.timings.gpu_release_timeout
            )
        await self.lives[backend.spec.name].move(BackendState.STOPPED, backend.replica)
        backend.became_ready.clear()
        self.kept.forget(backend.spec.label)  # nothing left to adopt

    async def stop(self) -> None:
        tasks = [b.task for b in self.backends.values() if b.task is not None]
        if self._progress is not None:
            tasks.append(self._progress)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        kept = [
            b
            for b in self.backends.values()
            if self.kept.keeps(b.replica, b.process.alive, self.lives[b.spec.name].state)
        ]
        await asyncio.gather(*(b.process.release() for b in kept))
        for backend in kept:
            log.info(
                "%s: left running for the next gateway to adopt within %.0fs (pid %s); "
                "`vllm-gateway stop-backends` ends it now",
                backend.spec.label,
                self.kept.keep_backends,
                backend.process.pid,
            )
        ending = [b for b in self.backends.values() if b not in kept]
        await asyncio.gather(*(b.process.stop(self.timings.stop_grace) for b in ending))
        for backend in self.backends.values():
            await self.lives[backend.spec.name].move(BackendState.STOPPED, backend.replica)
            if backend not in kept:
                self.kept.forget(backend.spec.label)
        for life in self.lives.values():
            await life.close()
        await asyncio.gather(*(b.client.aclose() for b in self.backends.values()))
        kept_sockets = {Path(b.replica.uds).parent for b in kept if b.replica.uds}
        if self._sockets is not None and self._sockets not in kept_sockets:
            shutil.rmtree(self._sockets, ignore_errors=True)
        self.kept.close()
