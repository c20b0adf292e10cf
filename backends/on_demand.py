"""On-demand models: started by their first request, unloaded when idle or when a swap needs
their GPUs.

One ``OnDemandModel`` is the on-demand policy of one spawned model (all its replicas start
and stop together): it decides when the model starts, drains, sleeps and stops, and asks the
model's life (``backends.life``, the one writer of every state) for each move, along these:

    stopped   -> starting   a request or `/admin/models/{name}/load` asked for it; the
                            switchboard has made room on its GPUs first (``backends.swaps``)
              -> starting   on start, the servers the last gateway left serving were adopted
                            (then ready at once, without a start)
              -> asleep     on start, the servers it left sleeping were adopted asleep
    starting  -> ready      one of its servers answered ready
              -> stopped    the start failed or outlasted `start_timeout`: every waiting request
                            is refused, and the next start waits a backoff
    ready     -> draining   idle for `idle_ttl`, an admin unload, or a swap needs its GPUs
    draining  -> stopped    its requests ended, or `drain_timeout` cut them; servers ended
              -> sleeping   `unload: sleep` and no request left in flight (vLLM's sleep mode)
    sleeping  -> asleep     the servers sleep; their processes live, their GPU memory is free
              -> stopped    a server did not fall asleep, or none was left to: stopped instead
    asleep    -> waking     a request or an admin wants it; room is made as for a start
              -> stopped    a swap needs even the little an asleep model holds, or an admin
    waking    -> ready      every server woke
              -> starting   a wake failed: the servers restart, and the requests wait on

Requests wait in ``ready()`` while the model starts (one start, however many wait) and while
it drains (for the next start), counted and bounded by the model's queue
(``backends.queues``: they call it as their ``bring_up``), each also a ``Waiter`` the swap
scheduler reads (``backends.demand``); one with a deadline is refused at once when the
estimated wait runs past it, or when it passes, never served late. The model measures what
its starts, wakes and sleeps take and how fast it serves (``backends.swap_costs``), for the
scheduler. The servers themselves are started and stopped by the supervisor, through the
calls of ``Servers``; their replicas keep their own states (``backends.lifecycle``). Waiting
for a drain is waiting on the leases' releases. Times are on the loop's clock (``backends.clock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Literal

from backends import clock, lifecycle
from backends.demand import Waiter
from backends.errors import (
    DeadlineUnmet,
    LoadFailed,
    ShuttingDown,
    SleepModeError,
    StartFailed,
)
from backends.lifecycle import BackendState
from backends.on_demand_api import OnDemand, Servers
from backends.pool import Replica, ReplicaPool
from backends.queues import ModelQueue
from backends.swap_costs import DecayedRate, SwapCosts

if TYPE_CHECKING:
    from backends.kept import Resumed
    from backends.swaps import Switchboard

log = logging.getLogger("vllm_gateway.on_demand")
S = BackendState
BACKOFF_BASE, BACKOFF_CAP = 2.0, 60.0  # after failed starts, as the supervisor's restarts
MAX_KEPT_LOAD_TIMES = 1000


class OnDemandModel:
    def __init__(
        self,
        name: str,
        config: OnDemand,
        servers: Servers,
        asleep_share: float = 0.0,
        weight_bytes: float | None = None,
    ) -> None:
        """``asleep_share``: what each of its servers keeps of each of its GPUs while asleep
        (CUDA's context); running, a server takes its replica's ``share``. ``weight_bytes``:
        the host memory its servers' weights take asleep at level 1 (None: unknown)."""
        self.name = name
        self.config = config
        self.servers = servers
        self.life = servers.life(name)
        self.asleep_share = asleep_share
        self.weight_bytes = weight_bytes
        self.replicas: Sequence[Replica] = self.life.replicas
        self.waiters: list[Waiter] = []
        self.costs = SwapCosts(config.costs)
        self.arrivals = DecayedRate()  # its recent demand, every request counted
        self.asked_with: dict[int, float] = {}  # priority -> when a request last came with it
        self.asked_by: dict[str | None, float] = {}  # key -> when its last request came
        self.refused: dict[str, int] = {"deadline": 0, "deadline_passed": 0}
        self.swapped_out = 0  # times a swap unloaded it for another model
        self.thrash_loaded = False  # brought in for thrashing keys alone (backends.cost_policy)
        self.slept_at_1 = False  # since its servers started: they keep a host copy of weights
        self.unloading_level = 0  # while it unloads: the level it goes to sleep at (0: stops)
        self.loads = 0
        self.load_times: list[float] = []  # seconds per successful start, oldest first
        self.sleeps = self.wakes = 0
        self.wake_times: list[float] = []  # seconds per successful wake, oldest first
        self.slept_level = 0  # the level it went to sleep with, while asleep
        self.last_request: float | None = None  # time.time(), for people
        self.resident_since: float | None = None  # clock.now(), while ready
        self.failures = 0  # failed starts in a row
        self.not_before = 0.0  # clock.now() before which no start begins (backoff)
        self.board: Switchboard | None = None  # set by the switchboard it joins
        self._touched = 0.0  # clock.now() of the last request
        self._start: asyncio.Task[None] | None = None
        self._unload: asyncio.Task[None] | None = None
        self._idle: asyncio.Task[None] | None = None

    @property
    def state(self) -> BackendState:
        return self.life.state

    @property
    def state_since(self) -> float:
        return self.life.state_since

    @property
    def usage(self) -> dict[int, float]:
        """GPU index -> the share of it the model's servers take when all run."""
        usage: dict[int, float] = {}
        for replica in self.replicas:
            for gpu in replica.gpus:
                usage[gpu] = usage.get(gpu, 0.0) + replica.share
        return usage

    def holds(self) -> dict[int, float]:
        """GPU index -> what its servers hold there now, replica by replica: all of it from
        a start (or wake) on, nothing for a stopped server, CUDA's context for an asleep one."""
        if self.state is S.STOPPED:
            return {}
        if self.state in (S.STARTING, S.WAKING):
            return self.usage
        held: dict[int, float] = {}
        for replica in self.replicas:
            if replica.state in (S.STOPPED, S.FAILED):
                continue
            share = self.asleep_share if replica.state is S.ASLEEP else replica.share
            for gpu in replica.gpus:
                held[gpu] = held.get(gpu, 0.0) + share
        return held

    @property
    def in_flight(self) -> int:
        return self.life.in_flight

    @property
    def queue(self) -> ModelQueue:
        """Who waits for it (``queue.waiters()``): its life's queue."""
        return self.life.queue

    @property
    def waiting(self) -> int:
        """Requests waiting for it: in its queue (``backends.queues``; those waiting in
        ``ready()`` for its start are among them), or in ``ready()`` when called directly."""
        return max(self.life.queue.waiting, len(self.waiters))

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self.in_flight > 0

    @property
    def last_used(self) -> float:
        """clock.now() of its last activity: a request's arrival or end, or its start."""
        ends = (r.last_done for r in self.replicas)
        return max(self._touched, self.resident_since or 0.0, *ends)

    @property
    def serving(self) -> bool:
        return self.state is S.READY

    @property
    def resident_for(self) -> float:
        return 0.0 if self.resident_since is None else clock.now() - self.resident_since

    async def ready(
        self, deadline: float | None = None, *, key: str | None = None, priority: int = 0
    ) -> float:
        """Return once the model serves, starting it if needed; the seconds this waited.

        Raises ``Unavailable`` when the queue is full, the start failed or the gateway stops;
        ``DeadlineUnmet`` when the estimated wait runs past ``deadline`` (on the clock), at
        once (its start goes on, as for a client that left), or when it passes meanwhile.
        A caller that is cancelled (its client left) leaves the queue; the start goes on.
        """
        began = clock.now()
        self._touched, self.last_request = began, time.time()
        self.arrivals.tick(began)
        self.asked_with[priority] = began
        self.asked_by[key] = began
        if self.serving:
            return 0.0
        if self.board is not None and self.board.closing:
            raise _shutting_down()
        if deadline is not None:
            self._refuse_if_late(deadline, priority, key)
        waiter = Waiter(began, priority, deadline, key)
        self._waits(waiter, True)
        limit = asyncio.timeout_at(deadline)
        try:
            async with limit:
                await self._until_serving()
            return clock.now() - began
        except TimeoutError:
            if not limit.expired():
                raise
            self.refused["deadline_passed"] += 1
            raise self._too_late(began, "its deadline passed while it waited") from None
        finally:
            self._waits(waiter, False)

    async def _until_serving(self) -> None:
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

    def _waits(self, waiter: Waiter, comes: bool) -> None:
        if comes:
            self.waiters.append(waiter)
        else:
            self.waiters.remove(waiter)
        if self.board is not None:
            self.board.changed.fire()

    def _refuse_if_late(self, deadline: float, priority: int, key: str | None) -> None:
        estimate = self.estimate(priority, deadline, key)
        if estimate is None or clock.now() + estimate <= deadline:
            return
        self.refused["deadline"] += 1
        self.load()  # the start goes on: a retry after the estimate may find it serving
        raise DeadlineUnmet(
            f"Model {self.name!r} is not serving and would take about {estimate:.1f}s, "
            f"longer than this request's {max(0.0, deadline - clock.now()):.1f}s "
            "(x-vllm-gateway-max-wait); retry later.",
            retry_after=estimate,
            estimate=estimate,
            passed=False,
        )

    def _too_late(self, began: float, why: str) -> DeadlineUnmet:
        estimate = self.estimate()
        known = "" if estimate is None else f"; it is still about {estimate:.1f}s away"
        return DeadlineUnmet(
            f"Model {self.name!r} did not serve within {clock.now() - began:.1f}s: {why}"
            f"{known} (x-vllm-gateway-max-wait); retry later.",
            retry_after=estimate if estimate is not None else self.config.retry_after_full,
            estimate=estimate,
            passed=True,
        )

    def estimate(
        self, priority: int = 0, deadline: float | None = None, key: str | None = None
    ) -> float | None:
        """Seconds a request arriving now would wait (``Switchboard.estimate``)."""
        if self.board is None:
            return None
        return self.board.estimate(self, Waiter(clock.now(), priority, deadline, key))

    def _estimated(self, priority: int = 0) -> str:
        estimate = self.estimate(priority)
        return "" if estimate is None else f" (estimated wait {estimate:.1f}s)"

    def bring_up_cost(self) -> float | None:
        """Estimated seconds from its turn to serving: a wake at the level it sleeps (or is
        going to sleep) at, else a start."""
        if self.state in (S.ASLEEP, S.WAKING) and self.slept_level:
            return self.costs.wake(self.slept_level)
        if self.state in (S.DRAINING, S.SLEEPING) and self.unloading_level:
            return self.costs.wake(self.unloading_level)
        return self.costs.cost("start")

    def served(self, seconds: float, tokens: int) -> None:
        """A request it served ended: ``seconds`` upstream, ``tokens`` generated."""
        ended = clock.now()
        self.costs.service.served(ended - seconds, ended, tokens)

    def noted(
        self,
        arrivals: Iterable[tuple[float, str | None, int]],
        served: Iterable[tuple[float, float, int]],
    ) -> None:
        """Requests another process relayed while the model served (a worker of the gateway,
        which tells them in batches), counted as this process counts its own: each arrival
        ``(at, key, priority)`` as one that ``ready()`` found serving, each end ``(ended,
        seconds, tokens)`` as ``served()``. Times are on this clock, and may be older than
        ones counted already (another worker's batch came first)."""
        now, rate = clock.now(), self.arrivals
        for at, key, priority in arrivals:
            at = min(at, now)
            counted = max(at, rate.at)  # the rate's count is kept as of its last tick
            rate.tick(counted, math.exp((at - counted) / rate.tau))  # decayed to that time
            self.asked_with[priority] = max(at, self.asked_with.get(priority, at))
            self.asked_by[key] = max(at, self.asked_by.get(key, at))
            if at > self._touched:
                self._touched, self.last_request = at, time.time() - (now - at)
        for ended, seconds, tokens in sorted(served):
            self.costs.service.served(ended - seconds, ended, tokens)

    def want(self) -> None:
        """A request for the model went elsewhere rather than wait (a fallback): start or wake
        it all the same, so that later ones find it serving. Nothing waits on that start; a
        failure is logged, and its backoff holds the next start back as usual."""
        self._touched, self.last_request = clock.now(), time.time()
        if self.serving or self._start is not None:
            return
        if self.board is not None and self.board.closing:
            return
        self.load()  # a start nobody awaits: ``load`` marks its outcome as seen

    def load(self) -> asyncio.Task[None]:
        """The start in progress, or a new one: concurrent callers share one."""
        if self._start is None:
            self._start = asyncio.create_task(self._load(), name=f"load:{self.name}")
            self._start.add_done_callback(_seen)  # a start nobody waits for fails quietly
        return self._start

    def unload(
        self, reason: str, *, stop: bool = False, level: int | None = None
    ) -> asyncio.Task[None]:
        """Drain, then sleep (`unload: sleep`, at ``level`` or the configured one) or stop
        (``stop``, or `unload: stop`); the unload in progress if one is."""
        if self._unload is None:
            sleep = self.config.unload == "sleep" and not stop
            chosen = (level or self._sleep_level()) if sleep else 0
            self._unload = asyncio.create_task(self._release(reason, chosen))
        return self._unload

    async def adopted(self, kept: Resumed) -> None:
        """On start: the servers the last gateway left running were taken over (``kept``),
        and the model is where they are. Serving: ready, resident from now, its idle timer
        running as after a start (any server not adopted starts beside them). Asleep: asleep
        at the level they fell asleep with, holding the asleep share; a request wakes it."""
        if self.state is not S.STOPPED:
            return
        if kept.asleep:
            configured = self.config.sleep_level  # unrecorded with `auto`: 2 wakes either
            self.slept_level = kept.level or (2 if configured == "auto" else configured)
            await self.life.move(S.ASLEEP)
            log.info("%s: adopted asleep (level %d)", self.name, self.slept_level)
            return
        await self.life.move(S.STARTING)
        try:
            await self.servers.load(self.name)  # at once: one server serves already
        except LoadFailed as exc:  # it died since; the others failed: as a failed start
            log.error("%s: the adopted servers did not serve: %s", self.name, exc)
            await self.servers.unload(self.name)
            await self.life.move(S.STOPPED)
            return
        self.resident_since = clock.now()
        await self.life.move(S.READY)
        log.info("%s: adopted its running servers", self.name)
        self._idle = asyncio.create_task(self._unload_when_idle(), name=f"idle:{self.name}")

    def _sleep_level(self) -> int:
        if self.board is not None:
            return self.board.sleep_level(self)
        level = self.config.sleep_level
        return 2 if level == "auto" else level

    async def close(self) -> None:
        """The gateway stops: no more starts; waiting requests are refused at once."""
        for task in (self._start, self._idle):
            if task is not None:
                task.cancel()

    async def _load(self) -> None:
        try:
            if self._unload is not None:
                await self._unload
            if self.state is S.READY:
                return
            await self._bring_up()
        finally:
            self._start = None

    async def _bring_up(self) -> None:
        """Wake the model if it sleeps (a failed wake restarts it), else start it."""
        assert self.board is not None
        config = self.config
        began = clock.now()
        try:
            async with asyncio.timeout(config.start_timeout):
                if self.state is S.ASLEEP:
                    if not await self.board.make_room(self, S.WAKING):
                        return  # nobody waits any more: the swap was dropped
                    turn, level = clock.now(), self.slept_level
                    if await self._woke():
                        self.costs.observe(f"wake_{level}", clock.now() - turn)
                        return await self._up("woke", began)
                    await self.life.move(S.STARTING)
                elif not await self.board.make_room(self, S.STARTING):  # after its backoff
                    return
                turn = clock.now()
                self.slept_at_1 = False  # new servers: no host copy of their weights yet
                await self.servers.load(self.name)
        except (TimeoutError, LoadFailed) as exc:
            reason = str(exc) or f"not ready after {config.start_timeout:g}s (start_timeout)"
            if self.state is S.STARTING:
                await self.servers.unload(self.name)
                await self.life.move(S.STOPPED)
            self.failures += 1
            backoff = lifecycle.backoff(self.failures, BACKOFF_BASE, BACKOFF_CAP)
            self.not_before = clock.now() + backoff
            log.error("%s: start failed: %s", self.name, reason)
            start = self.costs.cost("start")
            estimate = None if start is None else backoff + start
            known = "" if estimate is None else f"; the next start is about {estimate:.1f}s away"
            raise StartFailed(
                f"Model {self.name!r} could not be started: {reason}{known}",
                retry_after=backoff,
                estimate=estimate,
            ) from None
        except asyncio.CancelledError:
            if self.state in (S.STARTING, S.WAKING):
                await self.servers.unload(self.name)
                await self.life.move(S.STOPPED)
            raise
        self.costs.observe("start", clock.now() - turn)
        await self._up("loaded", began)

    async def _woke(self) -> bool:
        try:
            await self.servers.wake(self.name, self.slept_level)
        except SleepModeError as exc:
            log.error("%s: wake failed (%s); restarting its servers", self.name, exc)
            await self.servers.unload(self.name)
            return False
        return True

    async def _up(self, how: Literal["loaded", "woke"], began: float) -> None:
        seconds = clock.now() - began
        if how == "woke":
            self.wakes += 1
            self.wake_times = [*self.wake_times[-MAX_KEPT_LOAD_TIMES + 1 :], seconds]
        else:
            self.loads += 1
            self.load_times = [*self.load_times[-MAX_KEPT_LOAD_TIMES + 1 :], seconds]
        self.failures, self.slept_level = 0, 0
        self.resident_since = clock.now()
        await self.life.move(S.READY)
        log.info("%s: %s in %.2fs", self.name, how, seconds)
        if not (self.config.pinned and self.config.unload == "stop"):  # pinned: never stopped
            self._idle = asyncio.create_task(self._unload_when_idle(), name=f"idle:{self.name}")

    async def _release(self, reason: str, sleep_level: int) -> None:
        """Drain, then put to sleep at ``sleep_level`` (0: stop)."""
        self.unloading_level = sleep_level
        try:
            if self._start is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._start)
            if self.state is S.ASLEEP and not sleep_level:
                return await self._stop(reason)  # even the little it holds asleep must go
            if self.state is not S.READY:
                return
            if self._idle is not None and self._idle is not asyncio.current_task():
                self._idle.cancel()
            self._idle = None
            await self.life.move(S.DRAINING)
            log.info("%s: unloading (%s); %d requests in flight", self.name, reason, self.in_flight)
            await self.servers.drain(self.name)
            drained = await self.life.drained(timeout=self.config.drain_timeout)
            if sleep_level and drained and await self._fell_asleep(sleep_level):
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
            self._unload, self.unloading_level = None, 0

    async def _fell_asleep(self, level: int) -> bool:
        """Only with nothing in flight: vLLM has crashed when put to sleep mid-decode."""
        await self.life.move(S.SLEEPING)
        began, first = clock.now(), level == 1 and not self.slept_at_1
        try:
            asleep = await self.servers.sleep(self.name, level)
        except SleepModeError as exc:
            log.error("%s: did not fall asleep (%s); stopping it instead", self.name, exc)
            return False
        if not asleep:
            log.warning("%s: no server left to put to sleep; stopping it instead", self.name)
            return False
        self.costs.observe("sleep_1_first" if first else f"sleep_{level}", clock.now() - began)
        self.sleeps, self.slept_level = self.sleeps + 1, level
        self.slept_at_1 = self.slept_at_1 or level == 1
        self.resident_since = None
        await self.life.move(S.ASLEEP)
        return True

    async def _stop(self, reason: str) -> None:
        began = clock.now()
        await self.servers.unload(self.name)
        self.costs.observe("stop", clock.now() - began)
        self.resident_since, self.slept_level, self.slept_at_1 = None, 0, False
        await self.life.move(S.STOPPED)
        log.info("%s: stopped (%s)", self.name, reason)

    async def _unload_when_idle(self) -> None:
        """Unload `idle_ttl` seconds after the last activity; an open stream is activity."""
        ttl = self.config.idle_ttl
        while self.state is S.READY:
            if self.in_flight:
                await self.life.drained()  # each release wakes this; then the TTL runs
                continue
            quiet = clock.now() - self.last_used
            if quiet >= ttl:
                self._idle = None  # this task ends with the unload; nothing to cancel
                await self.unload(f"idle for {ttl:g}s")
                return
            await asyncio.sleep(ttl - quiet)


def policy_of(pool: ReplicaPool) -> OnDemandModel | None:
    """A pool's on-demand policy in the process that runs it; None for an always-on model and
    in a worker process, whose pools hold a stand-in that asks the control plane."""
    model = pool.on_demand
    return model if isinstance(model, OnDemandModel) else None


def _seen(task: asyncio.Task[None]) -> None:
    """Its failure was logged, and told to whoever waited."""
    if not task.cancelled():
        task.exception()


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("The gateway is shutting down.", retry_after=1.0)
