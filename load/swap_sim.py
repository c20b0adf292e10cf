"""The swap replay's world: the gateway's own scheduler against fake vLLM servers, in virtual time.

What runs is the real code: ``backends.swaps.Switchboard``, ``backends.on_demand.OnDemandModel``
and the policy under test (``backends.swap_policy``), each model's ``ModelLife`` and replica
leases. Only the servers are fake (``backends.virtual_servers``, the supervisor's calls): they
take, in virtual seconds, what the H200 measurements took (load/results/gpu-2026-11-30.md):
a cold start of 80-90 s the first time and 50-60 s once the weights are in the page cache, a
level-2 wake of about 2.4 s and a level-1 wake of about 0.8 s, falling asleep at level 2 in
0.1 s and at level 1 in 16 s the first time after a start (the weights copied to host memory,
which they then keep until the server stops) and 0.35 s later; a level-1 sleep that finds no
host memory for its weights fails (the gateway then stops the server). A request takes its
prompt at 8,000 tokens/s and its output at 40 tokens/s, at most 64 at once per server.

The loop is ``backends.clock.VirtualTimeLoop``: its clock jumps to the next timer, so a day
replays in seconds, and every timeout of the code under test is on that clock.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Literal

from swap_traces import Row

from backends import clock
from backends.errors import DeadlineUnmet, QueueFull, Unavailable
from backends.on_demand import OnDemandModel
from backends.on_demand_api import OnDemand
from backends.pool import ReplicaPool
from backends.swaps import DEFAULT_BATCH_WINDOW, POLICIES, BatchWindows, Switchboard, Window
from backends.virtual_servers import Seconds, VirtualServers

GIB = 2**30
CONTEXT_SHARE = 1.0 / 141  # an asleep server's CUDA context on a 141 GiB H200
PREFILL_TPS, DECODE_TPS, MAX_SEQS = 8000.0, 40.0, 64


@dataclass(frozen=True, slots=True)
class SimModel:
    name: str
    gpus: tuple[int, ...]
    share: float
    weight_gib: float = 70.0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Scenario:
    models: tuple[SimModel, ...]
    host_free_gib: float  # host memory free for level-1 sleepers' weights
    min_resident: float = 30.0
    idle_ttl: float = 900.0


SCENARIOS = {
    # One GPU holds the hot model and one other at a time.
    "skewed-day": Scenario(
        (
            SimModel("chat", (0,), 0.5),
            SimModel("warm-a", (0,), 0.42),
            SimModel("warm-b", (0,), 0.42),
            SimModel("cold-a", (0,), 0.42),
            SimModel("cold-b", (0,), 0.42),
        ),
        host_free_gib=160.0,
    ),
    "skewed-day-1": Scenario(
        (
            SimModel("chat", (0,), 0.6),
            SimModel("warm-a", (0,), 0.6),
            SimModel("warm-b", (0,), 0.6),
            SimModel("cold-a", (0,), 0.6),
            SimModel("cold-b", (0,), 0.6),
        ),
        host_free_gib=160.0,
    ),
    # One GPU holds the batch job's model and one assistant at a time; the assistants'
    # requests outrank the batch job's.
    "batch-job": Scenario(
        (
            SimModel("batch", (0,), 0.5),
            SimModel("assist-a", (0,), 0.42),
            SimModel("assist-b", (0,), 0.42),
        ),
        host_free_gib=160.0,
    ),
    # The GPU replay's (load/gpu_swaps.py): two 7B-shape models that cannot share the GPU,
    # sleeping at level 2, and a tiny one beside either.
    "gpu-sessions": Scenario(
        (
            SimModel("sleep-a", (0,), 0.6, weight_gib=14.0),
            SimModel("sleep-b", (0,), 0.6, weight_gib=14.0),
            SimModel("tiny-c", (0,), 0.2, weight_gib=0.1),
        ),
        host_free_gib=0.0,
        min_resident=0.0,
        idle_ttl=3600.0,
    ),
    "alternation": Scenario(
        (
            SimModel("flip", (0,), 0.6),
            SimModel("flop", (0,), 0.6),
            SimModel("steady", (0,), 0.6),
        ),
        host_free_gib=160.0,
    ),
}


@dataclass(frozen=True, slots=True)
class Setup:
    """One run of a trace: the policy, the sleep level, whether deadlines are sent."""

    label: str
    policy: Literal["lru", "cost"]
    sleep_level: Literal[1, 2, "auto"]
    deadlines: bool
    window: Window = DEFAULT_BATCH_WINDOW


def h200_seconds(rng: random.Random) -> Seconds:
    """What each call takes, as measured on the H200: a model's first start 80-90 s, later
    ones 50-60 s; wakes about 0.8 s (level 1) and 2.4 s (level 2)."""
    started: set[str] = set()
    fixed = {"stop": 2.0, "sleep_1_first": 16.0, "sleep_1": 0.35, "sleep_2": 0.1}

    def seconds(phase: str, model: str) -> float:
        if phase == "start":
            first = model not in started
            started.add(model)
            return rng.uniform(80, 90) if first else rng.uniform(50, 60)
        if phase.startswith("wake_"):
            return rng.gauss(0.8 if phase == "wake_1" else 2.4, 0.05)
        return fixed[phase]

    return seconds


def sim_servers(scenario: Scenario, rng: random.Random) -> VirtualServers:
    servers = VirtualServers(h200_seconds(rng), host_free=scenario.host_free_gib * GIB)
    for m in scenario.models:
        servers.add(m.name, m.share, m.gpus, weights=m.weight_gib * GIB)
    return servers


@dataclass(slots=True)
class Outcome:
    row: Row
    result: str = "lost"  # served, refused (at once), expired (deadline passed), full, failed
    wait: float = 0.0
    estimate: float | None = None


@dataclass
class Run:
    setup: Setup
    outcomes: list[Outcome]
    swaps: int
    swapping: dict[str, float]
    failed_sleeps: int
    loads: int
    wakes: int
    span: float
    per_model: dict[str, dict[str, float]] = field(default_factory=dict)


async def replay(rows: list[Row], scenario: Scenario, setup: Setup, seed: int = 7) -> Run:
    servers = sim_servers(scenario, random.Random(seed))
    slots = {m.name: asyncio.Semaphore(MAX_SEQS) for m in scenario.models}
    models = {
        m.name: OnDemandModel(
            m.name,
            OnDemand(
                idle_ttl=scenario.idle_ttl,
                min_resident=scenario.min_resident,
                unload="sleep",
                sleep_level=setup.sleep_level,
                priority=m.priority if setup.policy == "cost" else 0,
            ),
            servers,
            asleep_share=CONTEXT_SHARE,
            weight_bytes=m.weight_gib * GIB,
        )
        for m in scenario.models
    }
    board = Switchboard(
        models.values(),
        policy=POLICIES[setup.policy](),
        windows=BatchWindows(setup.window),
        host_free=lambda: servers.host_free,
    )
    pools = {n: ReplicaPool(n, list(m.replicas)) for n, m in models.items()}
    await _warm_up(models, servers, board)
    began = clock.now()
    outcomes = [Outcome(row) for row in rows]
    tasks = []
    for outcome in outcomes:
        if (delay := began + outcome.row.t - clock.now()) > 0:
            await asyncio.sleep(delay)
        model = models[outcome.row.model]
        request = _request(outcome, model, pools[model.name], servers, slots[model.name], setup)
        tasks.append(asyncio.create_task(request))
    await asyncio.gather(*tasks)
    span = clock.now() - began
    await board.close()
    return Run(
        setup,
        outcomes,
        board.swaps,
        dict(servers.spent),
        servers.failed_sleeps,
        sum(m.loads for m in models.values()),
        sum(m.wakes for m in models.values()),
        span,
        {n: {"loads": m.loads, "wakes": m.wakes, "out": m.swapped_out} for n, m in models.items()},
    )


async def _warm_up(
    models: dict[str, OnDemandModel], servers: VirtualServers, board: Switchboard
) -> None:
    """A gateway that has run a while: every model was started once and is asleep (or, where
    its sleep failed, stopped). Nothing of it is counted."""
    for model in models.values():
        await model.ready()
        await model.unload("warm-up")
    for model in models.values():
        model.loads = model.wakes = model.sleeps = model.swapped_out = 0
    board.swaps = 0
    servers.spent.clear()
    servers.failed_sleeps = 0


async def _request(
    outcome: Outcome,
    model: OnDemandModel,
    pool: ReplicaPool,
    servers: VirtualServers,
    slots: asyncio.Semaphore,
    setup: Setup,
) -> None:
    row = outcome.row
    asked = clock.now()
    deadline = asked + row.deadline if setup.deadlines and row.deadline else None
    if not model.serving:
        outcome.estimate = model.estimate(row.priority)
    try:
        outcome.wait = await model.ready(deadline, key=row.key, priority=row.priority)
    except Unavailable as exc:
        outcome.result = _refusal(exc)
        outcome.wait = clock.now() - asked
        return
    replica = model.replicas[0]
    stops = servers.stops[model.name]
    began = clock.now()
    with replica.lease(pool):
        async with slots:
            await asyncio.sleep(row.prompt / PREFILL_TPS + row.output / DECODE_TPS)
    if servers.stops[model.name] != stops:
        outcome.result = "lost"  # cut by a stop while in flight
        return
    model.served(clock.now() - began, row.output)
    outcome.result = "served"


def _refusal(exc: Unavailable) -> str:
    if isinstance(exc, QueueFull):
        return "full"
    if isinstance(exc, DeadlineUnmet):
        return "expired" if exc.passed else "refused"
    return "failed"
