"""On-demand models: started by their first request, unloaded when idle or when a swap needs
their GPUs.

One ``OnDemandModel`` owns the on-demand state of one spawned model (all its replicas start
and stop together). It is the only writer of that state, and changes it along these moves:

    stopped   -> starting   a request or `/admin/models/{name}/load` asked for it; the
                            switchboard has made room on its GPUs first (``backends.swaps``)
    starting  -> ready      one of its servers answered ready
              -> stopped    the start failed or outlasted `start_timeout`: every waiting request
                            is refused, and the next start waits a backoff
    ready     -> draining   idle for `idle_ttl`, an admin unload, or a swap needs its GPUs
    draining  -> stopped    its requests ended, or `drain_timeout` cut them; servers ended
              -> sleeping   `unload: sleep` and no request left in flight (vLLM's sleep mode)
    sleeping  -> asleep     the servers sleep; their processes live, their GPU memory is free
              -> stopped    a server did not fall asleep: it is stopped instead
    asleep    -> waking     a request or an admin wants it; room is made as for a start
              -> stopped    a swap needs even the little an asleep model holds, or an admin
    waking    -> ready      every server woke
              -> starting   a wake failed: the servers restart, and the requests wait on

Requests wait in ``ready()`` while the model starts (one start, however many wait) and while
it drains (for the next start). The servers themselves are started and stopped by the
supervisor, through the three calls of ``Servers``; their replicas keep their own states
(``backends.lifecycle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal, Protocol

from backends import lifecycle
from backends.pool import Replica
from backends.sleep_mode import SleepModeError

if TYPE_CHECKING:
    from backends.swaps import Switchboard

log = logging.getLogger("vllm_gateway.on_demand")
DRAIN_POLL = 0.1  # seconds between looks at a draining model's requests
BACKOFF_BASE, BACKOFF_CAP = 2.0, 60.0  # after failed starts, as the supervisor's restarts
RETRY_AFTER_FULL = 5.0  # seconds a client is told to wait when the queue is full
MAX_KEPT_LOAD_TIMES = 1000


@dataclass(frozen=True)
class OnDemand:
    """`models[].on_demand`, in seconds (and requests)."""

    idle_ttl: float = 300.0
    start_timeout: float = 900.0
    max_waiting: int = 256
    min_resident: float = 30.0
    drain_timeout: float = 120.0
    unload: Literal["stop", "sleep"] = "stop"
    sleep_level: int = 1  # 1 wakes fastest; 2 falls asleep fastest (suits swaps)


class ModelState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"


class Unavailable(Exception):
    """A waiting request cannot be served now; it is answered 503 with ``retry_after``."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(Unavailable):
    pass


class StartFailed(Unavailable):
    pass


class ShuttingDown(Unavailable):
    pass


class LoadFailed(Exception):
    """Raised by ``Servers.load`` when no server of the model became ready; says why."""


class Servers(Protocol):
    """What the supervisor does for an on-demand model."""

    def replicas(self, name: str) -> list[Replica]: ...

    async def load(self, name: str) -> None:
        """Start the model's servers; return once one is ready, else raise LoadFailed."""

    def drain(self, name: str) -> None:
        """Take the model's ready servers out of the choice; their requests go on."""

    async def unload(self, name: str) -> None:
        """End the model's servers, whatever they are doing, and free their GPUs."""

    async def sleep(self, name: str, level: int) -> None:
        """Put the model's drained servers to sleep; SleepModeError if one does not."""

    async def wake(self, name: str, level: int) -> None:
        """Wake the model's sleeping servers; SleepModeError if one does not."""


class OnDemandModel:
    def __init__(
        self,
        name: str,
        config: OnDemand,
        servers: Servers,
        usage: dict[int, float],
        asleep_usage: dict[int, float] | None = None,
    ) -> None:
        """``usage``: GPU index -> the share of it the model's servers take when running;
        ``asleep_usage``: what they keep while asleep (CUDA's context)."""
        self.name = name
        self.config = config
        self.servers = servers
        self.usage = usage
        self.asleep_usage = asleep_usage or {}
        self.replicas: Sequence[Replica] = servers.replicas(name)
        self.state = ModelState.STOPPED
        self.state_since = time.monotonic()
        self.waiting = 0
        self.loads = 0
        self.load_times: list[float] = []  # seconds per successful start, oldest first
        self.sleeps = self.wakes = 0
        self.wake_times: list[float] = []  # seconds per successful wake, oldest first
        self.slept_level = 0  # the level it went to sleep with, while asleep
        self.last_request: float | None = None  # time.time(), for people
        self.resident_since: float | None = None  # time.monotonic(), while ready
        self.failures = 0  # failed starts in a row
        self.not_before = 0.0  # time.monotonic() before which no start begins (backoff)
        self.board: Switchboard | None = None  # set by the switchboard it joins
        self._touched = 0.0  # time.monotonic() of the last request
        self._start: asyncio.Task[None] | None = None
        self._unload: asyncio.Task[None] | None = None
        self._idle: asyncio.Task[None] | None = None

    @property
    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.replicas)

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self.in_flight > 0

    @property
    def last_used(self) -> float:
        """time.monotonic() of its last activity: a request's arrival or end, or its start."""
        ends = (r.last_done for r in self.replicas)
        return max(self._touched, self.resident_since or 0.0, *ends)

    @property
    def serving(self) -> bool:
        return self.state is ModelState.READY

    @property
    def resident_for(self) -> float:
        return 0.0 if self.resident_since is None else time.monotonic() - self.resident_since

    async def ready(self) -> float:
        """Return once the model serves, starting it if needed; the seconds this waited.

        Raises ``Unavailable`` when the queue is full, the start failed or the gateway stops.
        A caller that is cancelled (its client left) leaves the queue; the start goes on.
        """
        self._touched, self.last_request = time.monotonic(), time.time()
        if self.serving:
            return 0.0
        if self.board is not None and self.board.closing:
            raise _shutting_down()
        if self.waiting >= self.config.max_waiting:
            raise QueueFull(
                f"Model {self.name!r} is starting and {self.waiting} requests already wait "
                "for it; retry later.",
                retry_after=RETRY_AFTER_FULL,
            )
        self.waiting += 1
        began = time.monotonic()
        try:
            while not self.serving:
                if self._unload is not None:  # draining or falling asleep: then bring it up
                    await asyncio.shield(self._unload)
                    continue
                start = self.load()
                try:
                    await asyncio.shield(start)
                except asyncio.CancelledError:
                    if start.cancelled():  # the gateway stops; this caller did not leave
                        raise _shutting_down() from None
                    raise
            return time.monotonic() - began
        finally:
            self.waiting -= 1

    def load(self) -> asyncio.Task[None]:
        """The start in progress, or a new one: concurrent callers share one."""
        if self._start is None:
            self._start = asyncio.create_task(self._load(), name=f"load:{self.name}")
        return self._start

    def unload(
        self, reason: str, *, stop: bool = False, level: int | None = None
    ) -> asyncio.Task[None]:
        """Drain, then sleep (`unload: sleep`, at ``level`` or the configured one) or stop
        (``stop``, or `unload: stop`); the unload in progress if one is."""
        if self._unload is None:
            sleep = self.config.unload == "sleep" and not stop
            chosen = (level or self.config.sleep_level) if sleep else 0
            self._unload = asyncio.create_task(self._release(reason, chosen))
        return self._unload

    async def close(self) -> None:
        """The gateway stops: no more starts; waiting requests are refused at once."""
        for task in (self._start, self._idle):
            if task is not None:
                task.cancel()

    async def _load(self) -> None:
        try:
            if self._unload is not None:
                await self._unload
            if self.state is ModelState.READY:
                return
            await self._bring_up()
        finally:
            self._start = None

    async def _bring_up(self) -> None:
        """Wake the model if it sleeps (a failed wake restarts it), else start it."""
        assert self.board is not None
        config = self.config
        began = time.monotonic()
        try:
            async with asyncio.timeout(config.start_timeout):
                if self.state is ModelState.ASLEEP:
                    await self.board.make_room(self, ModelState.WAKING)
                    if await self._woke():
                        return self._up("woke", began)
                    self._move(ModelState.STARTING)
                else:
                    await self.board.make_room(self, ModelState.STARTING)  # after its backoff
                await self.servers.load(self.name)
        except (TimeoutError, LoadFailed) as exc:
            reason = str(exc) or f"not ready after {config.start_timeout:g}s (start_timeout)"
            if self.state is ModelState.STARTING:
                await self.servers.unload(self.name)
                self._move(ModelState.STOPPED)
            self.failures += 1
            backoff = lifecycle.backoff(self.failures, BACKOFF_BASE, BACKOFF_CAP)
            self.not_before = time.monotonic() + backoff
            log.error("%s: start failed: %s", self.name, reason)
            raise StartFailed(
                f"Model {self.name!r} could not be started: {reason}", retry_after=backoff
            ) from None
        except asyncio.CancelledError:
            if self.state in (ModelState.STARTING, ModelState.WAKING):
                await self.servers.unload(self.name)
                self._move(ModelState.STOPPED)
            raise
        self._up("loaded", began)

    async def _woke(self) -> bool:
        try:
            await self.servers.wake(self.name, self.slept_level)
        except SleepModeError as exc:
            log.error("%s: wake failed (%s); restarting its servers", self.name, exc)
            await self.servers.unload(self.name)
            return False
        return True

    def _up(self, how: Literal["loaded", "woke"], began: float) -> None:
        seconds = time.monotonic() - began
        if how == "woke":
            self.wakes += 1
            self.wake_times = [*self.wake_times[-MAX_KEPT_LOAD_TIMES + 1 :], seconds]
        else:
            self.loads += 1
            self.load_times = [*self.load_times[-MAX_KEPT_LOAD_TIMES + 1 :], seconds]
        self.failures, self.slept_level = 0, 0
        self.resident_since = time.monotonic()
        self._move(ModelState.READY)
        log.info("%s: %s in %.2fs", self.name, how, seconds)
        self._idle = asyncio.create_task(self._unload_when_idle(), name=f"idle:{self.name}")

    async def _release(self, reason: str, sleep_level: int) -> None:
        """Drain, then put to sleep at ``sleep_level`` (0: stop)."""
        try:
            if self._start is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._start)
            if self.state is ModelState.ASLEEP and not sleep_level:
                return await self._stop(reason)  # even the little it holds asleep must go
            if self.state is not ModelState.READY:
                return
            if self._idle is not None and self._idle is not asyncio.current_task():
                self._idle.cancel()
            self._idle = None
            self._move(ModelState.DRAINING)
            log.info("%s: unloading (%s); %d requests in flight", self.name, reason, self.in_flight)
            self.servers.drain(self.name)
            deadline = time.monotonic() + self.config.drain_timeout
            while self.in_flight and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL)
            if sleep_level and not self.in_flight and await self._fell_asleep(sleep_level):
                return
            if self.in_flight:
                log.warning(
                    "%s: cutting %d requests still in flight after %gs (drain_timeout)",
                    self.name,
                    self.in_flight,
                    self.config.drain_timeout,
                )
            await self._stop(reason)
        finally:
            self._unload = None

    async def _fell_asleep(self, level: int) -> bool:
        """Only with nothing in flight: vLLM has crashed when put to sleep mid-decode."""
        self._move(ModelState.SLEEPING)
        try:
            await self.servers.sleep(self.name, level)
        except SleepModeError as exc:
            log.error("%s: did not fall asleep (%s); stopping it instead", self.name, exc)
            return False
        self.sleeps, self.slept_level = self.sleeps + 1, level
        self.resident_since = None
        self._move(ModelState.ASLEEP)
        return True

    async def _stop(self, reason: str) -> None:
        await self.servers.unload(self.name)
        self.resident_since, self.slept_level = None, 0
        self._move(ModelState.STOPPED)
        log.info("%s: stopped (%s)", self.name, reason)

    async def _unload_when_idle(self) -> None:
        """Unload `idle_ttl` seconds after the last activity; an open stream is activity."""
        ttl = self.config.idle_ttl
        while self.state is ModelState.READY:
            if self.busy:
                await asyncio.sleep(min(ttl, 1.0))
                continue
            quiet = time.monotonic() - self.last_used
            if quiet >= ttl:
                self._idle = None  # this task ends with the unload; nothing to cancel
                await self.unload(f"idle for {ttl:g}s")
                return
            await asyncio.sleep(ttl - quiet)

    def _move(self, to: ModelState) -> None:
        self.state, self.state_since = to, time.monotonic()


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("The gateway is shutting down.", retry_after=1.0)
