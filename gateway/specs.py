"""From the config's spawn-mode models to the supervisor's backend specs, and the on-demand
models' switchboard."""

from __future__ import annotations

import sys

from backends.adapters import RUNTIME_ENV
from backends.gpus import visible_gpu_memory
from backends.on_demand import OnDemand, OnDemandModel, Servers
from backends.placement import shares_per_gpu
from backends.sleep_mode import DEV_MODE_ENV, SLEEP_MODE_FLAG
from backends.spec import VllmSpec
from backends.supervisor import SpawnHealth
from backends.swaps import Switchboard
from gateway.settings import GatewaySettings


def backend_specs(settings: GatewaySettings) -> list[VllmSpec]:
    """One spec per replica of every spawn-mode model."""
    specs = []
    for model in settings.models:
        if model.vllm is None:
            continue
        groups = model.vllm.replica_gpus()
        args, env = dict(model.vllm.args), dict(model.vllm.env)
        if model.on_demand is not None and model.on_demand.unload == "sleep":
            args[SLEEP_MODE_FLAG] = True
            env.update(DEV_MODE_ENV)
        if (lora := model.vllm.lora) is not None:
            args["enable-lora"] = True
            args["max-lora-rank"] = lora.max_rank
            if lora.adapters:
                args["lora-modules"] = [f"{name}={path}" for name, path in lora.adapters.items()]
            if lora.runtime:
                env.update(RUNTIME_ENV)
        sleeps = model.on_demand is not None and model.on_demand.unload == "sleep"
        listen = model.vllm.listen or ("unix" if sleeps else "tcp")
        for index, gpus in enumerate(groups):
            specs.append(
                VllmSpec(
                    name=model.name,
                    model=model.vllm.model,
                    launcher=launcher(settings.launcher),
                    gpus=tuple(gpus),
                    args=args,
                    env=env,
                    replica=index if len(groups) > 1 else None,
                    unix_socket=listen == "unix",
                )
            )
    return specs


def launcher(configured: list[str]) -> tuple[str, ...]:
    """A launcher that starts with `python` runs under the gateway's own interpreter, the one
    whose environment has vLLM installed, whatever `python` means on the PATH."""
    if configured[0] in ("python", "python3"):
        return (sys.executable, *configured[1:])
    return tuple(configured)


def gpu_memory(settings: GatewaySettings) -> float | None:
    """Bytes per GPU: the config's `gpu_memory_gib`, else what nvidia-smi says of GPU 0."""
    if settings.gpu_memory_gib is not None:
        return settings.gpu_memory_gib * 2**30
    if any(m.vllm is not None and m.vllm.gpus for m in settings.models):
        return visible_gpu_memory()
    return None


def spawn_health(settings: GatewaySettings) -> dict[str, SpawnHealth]:
    """How the supervisor watches each spawned model: the fields of `models[].health` that the
    config sets, spawn mode's defaults for the rest (connect mode's defaults differ)."""
    found = {}
    for model in settings.models:
        chosen = model.health.model_fields_set & {"interval", "timeout", "unhealthy_threshold"}
        if model.vllm is None or not chosen:
            continue
        default, health = SpawnHealth(), model.health
        found[model.name] = SpawnHealth(
            interval=health.interval if "interval" in chosen else default.interval,
            timeout=health.timeout if "timeout" in chosen else default.timeout,
            failures=health.unhealthy_threshold
            if "unhealthy_threshold" in chosen
            else default.failures,
        )
    return found


# What an asleep server keeps on each of its GPUs: CUDA's context and what vLLM holds on to
# (load/results/gpu-2026-11-30.md measured 0.91 GiB).
CUDA_CONTEXT_BYTES = 1.0 * 2**30


def on_demand_names(settings: GatewaySettings) -> frozenset[str]:
    return frozenset(m.name for m in settings.models if m.on_demand is not None)


def switchboard(settings: GatewaySettings, servers: Servers) -> Switchboard:
    """The on-demand models, each with the GPU shares it takes when running, and the shares the
    always-on models hold for ever."""
    specs = backend_specs(settings)
    names = on_demand_names(settings)
    memory = gpu_memory(settings)
    models = []
    for model in settings.models:
        if model.on_demand is None:
            continue
        config = OnDemand(**model.on_demand.model_dump())
        usage = shares_per_gpu([s for s in specs if s.name == model.name])
        asleep = {g: CUDA_CONTEXT_BYTES / memory for g in usage} if memory else {}
        models.append(OnDemandModel(model.name, config, servers, usage, asleep))
    return Switchboard(models, shares_per_gpu([s for s in specs if s.name not in names]))
