"""The worker processes: started by the control plane, restarted when they die.

One task per worker keeps it running: start it, wait for it to exit, tell the control plane
(``Plane.worker_exited``: its in-flight counts go, its last counts stay), start it again. A
worker that ran for a while comes back at once; one that keeps dying soon after its start
waits longer each time (the supervisor's doubling backoff). Nothing here touches a backend:
a worker holds none. A worker ends itself when its channel to the control plane closes, so
none outlives a control plane that was killed.

A worker that hangs without dying (its event loop stopped: a blocking call, a deadlock, a
SIGSTOP) would keep its share of the port's connections unanswered; the probe asks each one
to answer a ping every ``PROBE_EVERY`` seconds, and one that misses ``PROBE_MISSES`` in a row
is killed, and so started again like any worker that died.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from backends.lifecycle import backoff
from gateway.workers.channel import log_failure

log = logging.getLogger("vllm_gateway.workers")
STABLE_AFTER = 10.0  # seconds a worker must have run for its next death to count as a first
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
PROBE_EVERY, PROBE_TIMEOUT, PROBE_MISSES = 2.0, 5.0, 2  # a hung worker goes within ~15 s
Probe = Callable[[int, float], Awaitable[bool]]  # (row, timeout) -> it answered


class WorkerProcesses:
    def __init__(
        self,
        count: int,
        command: Callable[[int], list[str]],
        pass_fds: Sequence[int],
        exited: Callable[[int], None],
        probe: Probe | None = None,
    ) -> None:
        """``command(row)``: the worker's command line; ``pass_fds``: descriptors it inherits
        (the in-flight table); ``exited(row)``: told once each of its processes is gone;
        ``probe``: whether a worker answers (``Plane.answers``); None: none is probed."""
        self.count = count
        self.command = command
        self.pass_fds = tuple(pass_fds)
        self.exited = exited
        self.probe = probe
        self.hung = dict.fromkeys(range(count), 0)  # workers killed for not answering
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = dict.fromkeys(range(count), 0)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._keep(row), name=f"worker:{row}") for row in range(self.count)
        ]

    async def _keep(self, row: int) -> None:
        quick_deaths = 0
        while not self._stopping:
            began = time.monotonic()
            proc = await asyncio.create_subprocess_exec(*self.command(row), pass_fds=self.pass_fds)
            self.procs[row] = proc
            watch = asyncio.create_task(self._watch(row, proc), name=f"worker:{row}:probe")
            watch.add_done_callback(log_failure)  # a probe that raises is a bug: shown
            try:
                code = await proc.wait()
            finally:
                watch.cancel()
            self.exited(row)
            if self._stopping:
                return
            quick = time.monotonic() - began < STABLE_AFTER
            quick_deaths = quick_deaths + 1 if quick else 0
            wait = backoff(quick_deaths, BACKOFF_BASE, BACKOFF_CAP) if quick else 0.0
            self.restarts[row] += 1
            log.warning(
                "worker %d (pid %d) exited with %s; starting it again in %.1fs",
                row,
                proc.pid,
                _how(code),
                wait,
            )
            await asyncio.sleep(wait)

    async def _watch(self, row: int, proc: asyncio.subprocess.Process) -> None:
        """Kill ``proc`` once it misses ``PROBE_MISSES`` pings in a row."""
        if self.probe is None:
            return
        misses = 0
        while misses < PROBE_MISSES:
            await asyncio.sleep(PROBE_EVERY)
            answered = await self.probe(row, PROBE_TIMEOUT)
            misses = 0 if answered else misses + 1
        if self._stopping or proc.returncode is not None:
            return
        log.error(
            "worker %d (pid %d) answered none of its last %d pings (%gs each); killing it",
            row,
            proc.pid,
            PROBE_MISSES,
            PROBE_TIMEOUT,
        )
        self.hung[row] += 1
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    async def stop(self, grace: float) -> None:
        """Each worker is asked to end (it finishes the requests it relays, as a gateway that
        stops does), and killed after ``grace`` seconds."""
        self._stopping = True
        running = [p for p in self.procs.values() if p.returncode is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(grace):
                await asyncio.gather(*(p.wait() for p in running))
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    log.warning("worker pid %d did not end in %gs; killing it", proc.pid, grace)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
        for task in self._tasks:
            task.cancel()  # one waiting to start its worker again
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for proc in self.procs.values():
            if proc.returncode is None:  # started while this stop began
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


class RestartCollector(Collector):
    """`vllm_gateway_worker_restarts_total{worker}`: each worker's deaths, and
    `vllm_gateway_worker_hangs_total{worker}`: those the liveness probe caused; read at scrape."""

    def __init__(self, processes: WorkerProcesses) -> None:
        self.processes = processes

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, text, counts in (
            (
                "vllm_gateway_worker_restarts",
                "Times the control plane started a worker again after it died (workers: N).",
                self.processes.restarts,
            ),
            (
                "vllm_gateway_worker_hangs",
                "Workers killed for answering no liveness ping (then started again).",
                self.processes.hung,
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["worker"])
            for row, count in sorted(counts.items()):
                family.add_metric([str(row)], count)
            yield family


def _how(code: int) -> str:
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"status {code}"
