"""Traffic traces for the swap replay (load/swaps.py): the format, and the traces.

A trace is JSON lines, one request each, in arrival order:

    {"t": 12.5, "model": "chat", "key": "user-3", "priority": 1, "deadline": 30,
     "prompt": 812, "output": 240}

``t``: seconds from the trace's start; ``priority``: higher goes first (0 default);
``deadline``: the seconds the client waits at most for its model (sent as
`x-vllm-gateway-max-wait`; null: as long as it takes); ``prompt``/``output``: tokens.

Each trace comes with its scenario (``load/swap_sim.py``: which models share which GPUs).
The generators are seeded: the same seed gives the same trace.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

DAY = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class Row:
    t: float
    model: str
    key: str
    priority: int = 0
    deadline: float | None = None
    prompt: int = 500
    output: int = 200


def write(rows: Iterable[Row], path: Path) -> None:
    with path.open("w") as out:
        for row in rows:
            out.write(json.dumps(asdict(row)) + "\n")


def read(path: Path) -> list[Row]:
    return [Row(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _lengths(rng: random.Random, prompt: float, output: float) -> tuple[int, int]:
    """Lognormal prompt and output lengths around the given medians."""
    p = int(min(32000, max(16, rng.lognormvariate(math.log(prompt), 0.8))))
    o = int(min(4000, max(8, rng.lognormvariate(math.log(output), 0.6))))
    return p, o


def _diurnal(t: float) -> float:
    """Traffic over a day, 0.15 at night to 1 in the afternoon."""
    hour = (t % DAY) / 3600.0
    return 0.15 + 0.85 * math.sin(math.pi * max(0.0, min(1.0, (hour - 6.0) / 16.0))) ** 2


def _sessions(
    rng: random.Random,
    model: str,
    rate: float,
    span: float,
    users: int,
    priority: int,
    deadline: tuple[float | None, float],
    length: tuple[float, float],
    think: float,
    bursts: Iterable[tuple[float, float, float]] = (),
    clock: float = 0.0,
) -> Iterator[Row]:
    """Users' sessions: they begin as a Poisson process (``rate`` per second at the day's
    peak, thinned by the diurnal curve at ``clock`` + t, times a burst's factor while one
    lasts), each a few requests (geometric, mean ``length[0]``) apart by an exponential think
    time."""
    bursts = list(bursts)
    top = max([1.0] + [f for _, _, f in bursts])
    t = 0.0
    while True:
        t += rng.expovariate(rate * top)
        if t >= span:
            return
        factor = next((f for s, e, f in bursts if s <= t < e), 1.0)
        if rng.random() > _diurnal(clock + t) * factor / top:
            continue
        user = f"{model}-user-{rng.randrange(users)}"
        at = t
        for _ in range(1 + int(rng.expovariate(1.0 / max(1e-9, length[0] - 1)))):
            if at >= span:
                break
            allows = deadline[0] if rng.random() < deadline[1] else None
            prompt, output = _lengths(rng, 800, length[1])
            yield Row(round(at, 3), model, user, priority, allows, prompt, output)
            at += rng.expovariate(1.0 / think)


def skewed_day(seed: int = 1) -> list[Row]:
    """A day on shared GPUs: one hot chat model, two warm ones, two cold ones. Interactive
    sessions, Poisson with the day's curve and a few bursts on the warm models."""
    rng = random.Random(seed)
    bursts = {
        "warm-a": [(11 * 3600.0, 11.5 * 3600.0, 4.0), (15 * 3600.0, 15.3 * 3600.0, 6.0)],
        "warm-b": [(14 * 3600.0, 14.4 * 3600.0, 5.0)],
    }
    rows: list[Row] = []
    # model, sessions/s at peak, users, priority, (max wait, share of requests that set it),
    # (requests per session, median output tokens), think time (s)
    plan = [
        ("chat", 1 / 12, 200, 1, (30.0, 0.5), (5.0, 250.0), 25.0),
        ("warm-a", 1 / 150, 30, 0, (120.0, 0.5), (4.0, 300.0), 30.0),
        ("warm-b", 1 / 150, 30, 0, (120.0, 0.5), (4.0, 300.0), 30.0),
        ("cold-a", 1 / 3600, 5, 0, (None, 0.0), (3.0, 400.0), 40.0),
        ("cold-b", 1 / 3600, 5, 0, (None, 0.0), (3.0, 400.0), 40.0),
    ]
    for model, rate, users, prio, deadline, length, think in plan:
        rows += _sessions(
            rng, model, rate, DAY, users, prio, deadline, length, think, bursts.get(model, [])
        )
    return sorted(rows, key=lambda r: r.t)


def batch_job(seed: int = 2) -> list[Row]:
    """Six working hours: a batch job sweeps one model at a steady rate (no deadline, low
    priority) while interactive users work with two others on the same GPUs."""
    rng = random.Random(seed)
    span = 6 * 3600.0
    rows: list[Row] = []
    t = 0.0
    while t < span:
        prompt, output = _lengths(rng, 1500, 400)
        rows.append(Row(round(t, 3), "batch", "batch-job", 0, None, prompt, output))
        t += rng.expovariate(0.5)
    for model in ("assist-a", "assist-b"):  # working hours: from 9 in the morning
        rows += _sessions(
            rng, model, 1 / 300, span, 20, 1, (60.0, 0.7), (6.0, 250.0), 20.0, clock=9 * 3600.0
        )
    return sorted(rows, key=lambda r: r.t)


def alternation(seed: int = 3) -> list[Row]:
    """Two hours: one key alternates between two models that cannot share a GPU, a request
    every few seconds, while other users work with a third model on the same GPU."""
    rng = random.Random(seed)
    span = 2 * 3600.0
    rows: list[Row] = []
    t, which = 0.0, 0
    while t < span:
        rows.append(Row(round(t, 3), ("flip", "flop")[which], "thrasher", 0, None, 300, 60))
        which ^= 1
        t += rng.uniform(2.0, 6.0)
    rows += _sessions(
        rng, "steady", 1 / 90, span, 20, 0, (120.0, 0.5), (4.0, 250.0), 30.0, clock=12 * 3600.0
    )
    return sorted(rows, key=lambda r: r.t)


def gpu_sessions(seed: int = 7, seconds: float = 3600.0) -> list[Row]:
    """The GPU replay's trace (load/gpu_swaps.py runs a minute or two of it): sessions of a
    few requests each, on two models that cannot share the GPU (sleep-a hot, sleep-b warm)
    and a tiny rare one that fits beside either."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for model, sessions_per_s, users in (("sleep-a", 0.15, 6), ("sleep-b", 0.1, 3),
                                          ("tiny-c", 0.05, 2)):  # fmt: skip
        t = rng.expovariate(sessions_per_s)
        while t < seconds:
            key, at = f"{model}-user-{rng.randrange(users)}", t
            for _ in range(1 + int(rng.expovariate(1 / 3))):
                if at < seconds:
                    rows.append(Row(round(at, 2), model, key, prompt=200, output=32))
                at += rng.expovariate(1 / 4)
            t += rng.expovariate(sessions_per_s)
    return sorted(rows, key=lambda r: r.t)


TRACES = {
    "skewed-day": skewed_day,
    "batch-job": batch_job,
    "alternation": alternation,
    "gpu-sessions": gpu_sessions,
}
