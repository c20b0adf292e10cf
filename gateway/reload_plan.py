"""What a reload would change, model by model, decided before anything is touched.

    unchanged   same settings: same processes, same connections, requests in flight untouched
    update      settings that apply in place to new requests (keys and limits are global;
                per model: aliases, balancing, health, on-demand and queue settings,
                timeouts, fallbacks, ...)
    restart     its servers would start with another command or environment (its `vllm:`
                block, the `launcher`), or it moves between spawn and connect mode
    start       a model the old config did not have (an on-demand one stays stopped)
    stop        a model the new config no longer has

A change that needs a new listener (`host`, `port`, `workers`, and what the HTTP protocol is
built with) refuses the reload as a whole, and so do a GPU layout that cannot work (``check``'s
rules) and what is set up once at start: `tracing`, `limits_store` (its password too). A key's
own limits (`requests_per_minute`, `max_concurrent`) apply in place, whatever the store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from backends.gpus import visible_gpu_count
from backends.placement import placement_problems
from backends.spec import VllmSpec
from gateway.model_settings import ModelSettings
from gateway.settings import GatewaySettings
from gateway.specs import backend_specs, swapped_names

Action = Literal["unchanged", "update", "restart", "start", "stop"]
# Settings the listening socket and its protocol are built with, once.
LISTENER_KEYS = ("host", "port", "max_head_bytes", "workers")


@dataclass(frozen=True, slots=True)
class ModelChange:
    name: str
    action: Action
    why: str


@dataclass(frozen=True)
class ReloadPlan:
    changes: list[ModelChange]
    refused: list[str] = field(default_factory=list)  # why nothing may be applied

    def of(self, action: Action) -> list[str]:
        return [c.name for c in self.changes if c.action == action]

    def document(self) -> dict[str, Any]:
        return {
            "models": [{"name": c.name, "action": c.action, "why": c.why} for c in self.changes],
            "refused": self.refused,
        }


def plan_reload(
    old: GatewaySettings, new: GatewaySettings, gpu_count: int | None = None
) -> ReloadPlan:
    """``gpu_count``: the GPUs the new layout is checked against (None: ask the driver)."""
    refused = [
        f"{key}: {getattr(old, key)!r} -> {getattr(new, key)!r} needs a new listener; "
        "restart the gateway to change it"
        for key in LISTENER_KEYS
        if getattr(old, key) != getattr(new, key)
    ]
    if old.timeouts.client != new.timeouts.client:
        refused.append("timeouts.client: the HTTP protocol is built with it; restart the gateway")
    if old.tracing != new.tracing:
        refused.append("tracing: the exporter is set up once, at start; restart the gateway")
    if old.limits_store != new.limits_store:
        refused.append(
            "limits_store: the counters of requests in flight live there, opened once at "
            "start (moving them would lose those); restart the gateway to change it"
        )
    count = visible_gpu_count() if gpu_count is None else gpu_count
    refused += placement_problems(backend_specs(new), count, swapped_names(new))
    before = {m.name: m for m in old.models}
    after = {m.name: m for m in new.models}
    old_specs, new_specs = _specs_by_model(old), _specs_by_model(new)
    changes = []
    for name, model in after.items():
        if name not in before:
            later = " (on demand: it starts when asked)" if model.on_demand is not None else ""
            changes.append(ModelChange(name, "start", "a new model" + later))
        else:
            changes.append(_change(before[name], model, old_specs, new_specs))
    changes += [ModelChange(n, "stop", "no longer configured") for n in before if n not in after]
    return ReloadPlan(changes, refused)


def _change(
    old: ModelSettings,
    new: ModelSettings,
    old_specs: dict[str, list[VllmSpec]],
    new_specs: dict[str, list[VllmSpec]],
) -> ModelChange:
    name = new.name
    if (old.vllm is None) != (new.vllm is None):
        to = "spawn" if new.vllm is not None else "connect"
        return ModelChange(name, "restart", f"it moves to {to} mode")
    if old_specs.get(name) != new_specs.get(name):
        return ModelChange(name, "restart", "its servers' command changes: " + _differs(old, new))
    if old != new:
        return ModelChange(name, "update", "applied in place: " + _differs(old, new))
    return ModelChange(name, "unchanged", "same settings")


def _specs_by_model(settings: GatewaySettings) -> dict[str, list[VllmSpec]]:
    found: dict[str, list[VllmSpec]] = {}
    for spec in backend_specs(settings):
        found.setdefault(spec.name, []).append(spec)
    return found


def _differs(old: ModelSettings, new: ModelSettings) -> str:
    """The dotted paths of what changed, e.g. `vllm.args.max-model-len, aliases`."""
    paths = _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), "")
    return ", ".join(paths) or "its launcher"


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            found += _diff(old.get(key), new.get(key), where)
        return found
    return [] if old == new else [path]
