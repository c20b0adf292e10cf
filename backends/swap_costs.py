"""What a swap costs, as this gateway has seen it: running estimates per on-demand model.

The scheduler (``backends.swap_policy``) weighs which model leaves by what bringing it back
costs, and tells a waiting client how long it will wait; both read these. Each phase's estimate
starts from the config's value (`on_demand.costs`), or from the first time it is seen, and then
follows what is measured, recent times weighing most:

    start            a cold start: no server, to one that serves
    wake_1, wake_2   an asleep model serving again, by the level it slept at
    sleep_1_first    falling asleep at level 1 the first time after a start (vLLM copies the
                     weights to host memory then; later level-1 sleeps only free the GPU)
    sleep_1, sleep_2 falling asleep, by level
    stop             ending its servers

Its service rate (requests and generated tokens per second while it has requests in flight)
and the length of one request come from the requests it served.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PHASES = ("start", "wake_1", "wake_2", "sleep_1_first", "sleep_1", "sleep_2", "stop")
ALPHA = 0.3  # weight of each new observation once one has been seen
SERVICE_MEMORY = 50.0  # requests: the service rate remembers about this many
ARRIVALS_TAU = 120.0  # seconds: how fast a model's demand is forgotten


@dataclass(slots=True)
class Estimate:
    """A running mean: the first observation replaces a configured value (measured beats
    guessed), later ones move it by ``ALPHA``."""

    value: float | None = None
    seen: int = 0

    def observe(self, seconds: float) -> None:
        if self.seen == 0 or self.value is None:
            self.value = seconds
        else:
            self.value += ALPHA * (seconds - self.value)
        self.seen += 1


@dataclass(slots=True)
class Service:
    """Requests, generated tokens and busy seconds, each decayed per request served, so their
    ratios follow the recent rate; busy time counts overlapping requests once."""

    requests: float = 0.0
    tokens: float = 0.0
    busy: float = 0.0
    length: float = 0.0  # seconds, summed over the (decayed) requests
    _busy_until: float = -math.inf

    def served(self, began: float, ended: float, tokens: int) -> None:
        keep = 1.0 - 1.0 / SERVICE_MEMORY
        new_busy = max(0.0, ended - max(began, self._busy_until))
        self._busy_until = max(self._busy_until, ended)
        self.requests = self.requests * keep + 1.0
        self.tokens = self.tokens * keep + tokens
        self.busy = self.busy * keep + new_busy
        self.length = self.length * keep + (ended - began)

    @property
    def requests_per_s(self) -> float | None:
        return self.requests / self.busy if self.busy > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.busy if self.busy > 0 and self.tokens else None

    @property
    def request_s(self) -> float | None:
        return self.length / self.requests if self.requests else None


@dataclass(slots=True)
class DecayedRate:
    """Events per second, exponentially forgotten with time constant ``tau``."""

    tau: float = ARRIVALS_TAU
    count: float = 0.0
    at: float = 0.0

    def tick(self, now: float, weight: float = 1.0) -> None:
        self.count = self.value(now) + weight
        self.at = now

    def value(self, now: float) -> float:
        """The decayed count of events (about the events of the last ``tau`` seconds)."""
        return self.count * math.exp(-max(0.0, now - self.at) / self.tau)

    def rate(self, now: float) -> float:
        return self.value(now) / self.tau

    def below_at(self, rate: float, now: float) -> float:
        """When the rate will fall below ``rate`` if nothing more happens (``now`` if it is)."""
        current = self.rate(now)
        if current < rate or rate <= 0:
            return now if current < rate else math.inf
        return now + self.tau * math.log(current / rate)


@dataclass
class SwapCosts:
    """One model's estimates; ``first``: the config's values by phase (seconds)."""

    first: Mapping[str, float] = field(default_factory=dict)
    phases: dict[str, Estimate] = field(init=False)
    service: Service = field(default_factory=Service)

    def __post_init__(self) -> None:
        self.phases = {p: Estimate() for p in PHASES}
        self.reseed(self.first)

    def reseed(self, first: Mapping[str, float]) -> None:
        """New configured values (a reload) for the phases not measured yet."""
        self.first = first
        seeds = {"sleep_1_first": first["sleep_1"]} if "sleep_1" in first else {}
        seeds.update(first)
        for phase, estimate in self.phases.items():
            if estimate.seen == 0:
                estimate.value = seeds.get(phase)

    def observe(self, phase: str, seconds: float) -> None:
        self.phases[phase].observe(seconds)

    def cost(self, phase: str) -> float | None:
        return self.phases[phase].value

    def wake(self, level: int) -> float | None:
        return self.cost(f"wake_{level}")

    def sleep(self, level: int, first: bool) -> float | None:
        if level == 1 and first:
            return self.cost("sleep_1_first")
        return self.cost(f"sleep_{level}")

    def document(self) -> dict[str, Any]:
        """For `/admin/models` and `/status.json`: seconds per phase (null: never seen nor
        configured), times each was measured, and the service rate."""

        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 3)

        return {
            "seconds": {p: rounded(e.value) for p, e in self.phases.items()},
            "measured": {p: e.seen for p, e in self.phases.items()},
            "requests_per_s": rounded(self.service.requests_per_s),
            "tokens_per_s": rounded(self.service.tokens_per_s),
            "request_s": rounded(self.service.request_s),
        }
