"""A config's traffic rules as the relay reads them per request: each model's deadlines, and
each model's (or adapter's) fallbacks. Built once per config; a reload swaps in a new one for
new requests (``Relay.use_traffic``), and requests in flight keep the one they started with."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.settings import GatewaySettings
from gateway.traffic.fallback_plan import chains, fallback_graph
from gateway.traffic.settings import FallbackReason


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds: to connect (None: the HTTP client's own), to the first byte, between two
    chunks."""

    connect: float | None
    first_byte: float
    idle: float


@dataclass(frozen=True, slots=True)
class Fallbacks:
    chain: tuple[str, ...]  # the names tried in turn (``gateway.traffic.fallback_plan``)
    on: frozenset[FallbackReason]  # the failures that move a request on


@dataclass(frozen=True)
class TrafficPlan:
    default: Deadlines
    deadlines: dict[str, Deadlines] = field(default_factory=dict)  # by a model's name
    fallbacks: dict[str, Fallbacks] = field(default_factory=dict)  # by a model's or adapter's

    def deadlines_of(self, model: str) -> Deadlines:
        """A model's deadlines (an adapter has its base model's: pass the pool's name)."""
        return self.deadlines.get(model, self.default)

    @property
    def shortest(self) -> float:
        """The shortest deadline any request may get, which the deadline sweep must keep."""
        every = [self.default, *self.deadlines.values()]
        return min(min(d.first_byte, d.idle) for d in every)


def traffic_plan(settings: GatewaySettings) -> TrafficPlan:
    top = settings.timeouts
    default = Deadlines(top.connect, top.first_byte, top.idle)
    deadlines = {}
    for model in settings.models:
        own = model.timeouts
        if own.connect is None and own.first_byte is None and own.idle is None:
            continue
        deadlines[model.name] = Deadlines(
            connect=top.connect if own.connect is None else own.connect,
            first_byte=top.first_byte if own.first_byte is None else own.first_byte,
            idle=top.idle if own.idle is None else own.idle,
        )
    reasons = {m.name: frozenset(m.fallback_on) for m in settings.models}
    reasons |= {a: reasons[m.name] for m in settings.models for a in m.adapter_fallbacks}
    graph = fallback_graph(settings.models, settings.canonical_names)
    fallbacks = {node: Fallbacks(chain, reasons[node]) for node, chain in chains(graph).items()}
    return TrafficPlan(default, deadlines, fallbacks)
