"""Fake vLLM servers for on-demand models in virtual time: the supervisor's calls
(``backends.on_demand.Servers``), each taking the seconds its phase is given.

The scheduler's tests (``tests/backends/timed.py``) and the swap replay (``load/swap_sim.py``)
run the real ``OnDemandModel``, ``Switchboard`` and policies on
``backends.clock.VirtualTimeLoop`` against these, so a start of 60 s takes 60 virtual seconds
and no real ones. As vLLM's, a level-1 sleep copies the weights to host memory (kept until
the server stops) and fails when the host has too little free. Nothing here talks to a
process or a socket.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter, defaultdict
from collections.abc import Callable

from backends.errors import SleepModeError
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Replica

S = BackendState
Seconds = Callable[[str, str], float]  # (phase, model) -> seconds; phases of backends.swap_costs


class VirtualServers:
    """``seconds``: how long each call takes; ``host_free``: bytes of host memory free for
    level-1 sleepers' weights."""

    def __init__(self, seconds: Seconds, host_free: float = math.inf) -> None:
        self.seconds = seconds
        self.host_free = host_free
        self.lives: dict[str, ModelLife] = {}
        self.weights: dict[str, float] = {}
        self.host_copy: set[str] = set()  # models whose servers keep their weights on the host
        self.calls: list[str] = []  # "start a", "stop a", "sleep a 1", "wake a 1"
        self.spent: defaultdict[str, float] = defaultdict(float)  # seconds, per phase
        self.stops: Counter[str] = Counter()  # per model: a stop cuts what was in flight
        self.failed_sleeps = 0

    def add(
        self, name: str, share: float, gpus: tuple[int, ...] = (0,), weights: float = 0.0
    ) -> None:
        """A model of one stopped server, taking ``share`` of each of ``gpus`` and ``weights``
        bytes of host memory asleep at level 1."""
        replica = Replica(url=f"sim://{name}", state=S.STOPPED, gpus=gpus, share=share)
        self.lives[name] = ModelLife(name, [replica], on_demand=True)
        self.weights[name] = weights

    def life(self, name: str) -> ModelLife:
        return self.lives[name]

    async def load(self, name: str) -> None:
        self.calls.append(f"start {name}")
        await self._take("start", name)
        for replica in self.lives[name].replicas:
            await self.lives[name].move(S.LOADING, replica)
            await self.lives[name].move(S.READY, replica)

    async def drain(self, name: str) -> None:
        for replica in self.lives[name].replicas:
            await self.lives[name].move(S.DRAINING, replica, expected={S.READY})

    async def unload(self, name: str) -> None:
        self.calls.append(f"stop {name}")
        await self._take("stop", name)
        self.stops[name] += 1
        if name in self.host_copy:
            self.host_copy.discard(name)
            self.host_free += self.weights[name]
        for replica in self.lives[name].replicas:
            await self.lives[name].move(S.STOPPED, replica)

    async def sleep(self, name: str, level: int) -> int:
        self.calls.append(f"sleep {name} {level}")
        phase = f"sleep_{level}"
        if level == 1 and name not in self.host_copy:
            if self.host_free < self.weights[name]:
                self.failed_sleeps += 1
                raise SleepModeError(f"{name}: no host memory for its weights")
            self.host_free -= self.weights[name]
            self.host_copy.add(name)
            phase = "sleep_1_first"
        await self._take(phase, name)
        life = self.lives[name]
        for replica in life.replicas:
            await life.move(S.SLEEPING, replica, expected={S.DRAINING})
            await life.move(S.ASLEEP, replica)
        return len(life.replicas)

    async def wake(self, name: str, level: int) -> None:
        self.calls.append(f"wake {name} {level}")
        await self._take(f"wake_{level}", name)
        for replica in self.lives[name].replicas:
            await self.lives[name].move(S.WAKING, replica)
            await self.lives[name].move(S.READY, replica)

    async def _take(self, phase: str, name: str) -> None:
        seconds = self.seconds(phase, name)
        self.spent[phase] += seconds
        await asyncio.sleep(seconds)
