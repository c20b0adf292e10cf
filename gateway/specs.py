"""From the config's spawn-mode models to the supervisor's backend specs, and the on-demand
models' switchboard."""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

from backends.adapters import RUNTIME_ENV
from backends.gpus import visible_gpu_memory
from backends.kv_endpoints import KV_EVENTS_FLAG
from backends.on_demand import OnDemandModel
from backends.on_demand_api import OnDemand, Servers
from backends.placement import shares_per_gpu, weight_bytes
from backends.sleep_mode import DEV_MODE_ENV, SLEEP_MODE_FLAG
from backends.spec import VllmSpec
from backends.supervisor import SpawnHealth
from backends.swap_policy import SwapPolicy
from backends.swaps import POLICIES, BatchWindows, Switchboard
from gateway.model_settings import ModelSettings
from gateway.settings import GatewaySettings, state_path
from gateway.spawn_settings import ArgValue
from gateway.tracing_settings import TracingSettings


def backend_specs(settings: GatewaySettings) -> list[VllmSpec]:
    """One spec per replica of every spawn-mode model."""
    specs = []
    home = kv_events_home(settings)
    for model in settings.models:
        if model.vllm is None:
            continue
        groups = model.vllm.replica_gpus()
        args, env = dict(model.vllm.args), dict(model.vllm.env)
        if (tracing := settings.tracing) is not None and tracing.backends:
            args.setdefault("otlp-traces-endpoint", tracing.url)
            env = {**vllm_trace_env(tracing, model.name), **env}  # the model's own env wins
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
        prefix = model.balance == "prefix" and KV_EVENTS_FLAG not in args
        for index, gpus in enumerate(groups):
            replica = index if len(groups) > 1 else None
            specs.append(
                VllmSpec(
                    name=model.name,
                    model=model.vllm.model,
                    launcher=launcher(settings.launcher),
                    gpus=tuple(gpus),
                    args=with_kv_events(args, model.name, replica, home) if prefix else args,
                    env=env,
                    replica=replica,
                    unix_socket=listen == "unix",
                )
            )
    return specs


TRACE_HEADERS_ENV = "OTEL_EXPORTER_OTLP_TRACES_HEADERS"  # holds secrets: `plan` hides it


def vllm_trace_env(tracing: TracingSettings, model: str) -> dict[str, str]:
    """What vLLM's exporter reads besides its endpoint flag: the protocol (vLLM's default is
    gRPC), the collector's headers (secrets: by environment, never on the command line) and
    the resource that names the server."""
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": tracing.protocol,
        "OTEL_SERVICE_NAME": "vllm",
        "OTEL_RESOURCE_ATTRIBUTES": f"vllm_gateway.model={quote(model, safe='')}",
    }
    if tracing.headers:
        env[TRACE_HEADERS_ENV] = ",".join(
            f"{quote(name, safe='')}={quote(value, safe='')}"
            for name, value in tracing.header_values().items()
        )
    return env


def kv_events_home(settings: GatewaySettings) -> str:
    """What names this gateway's KV-event sockets: its state directory's digest, the same for
    the next gateway on the same config (so that a kept server's command, the endpoint in it,
    is the one the next gateway asks for: adoption compares commands) and apart from other
    gateways'. A digest, not the directory itself: a unix socket's path is short."""
    return hashlib.sha256(str(state_path(settings).resolve()).encode()).hexdigest()[:12]


def with_kv_events(
    args: dict[str, ArgValue], name: str, replica: int | None, home: str
) -> dict[str, Any]:
    """A `balance: prefix` model's servers publish their KV-cache events (``backends.kv_events``)
    on an ipc socket of their own, which vLLM binds and the gateway connects to."""
    label = name if replica is None else f"{name}-{replica}"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    # a directory of its own, made 0700 when the server starts (``backends.kv_endpoints``)
    path = Path(tempfile.gettempdir()) / f"vllm-gateway-kv-{home}" / safe
    config = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"ipc://{path}"}
    return {**args, KV_EVENTS_FLAG: config}


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
    return {m.name: m.health.spawn_checks() for m in settings.models if m.vllm is not None}


# What an asleep server keeps on each of its GPUs: CUDA's context and what vLLM holds on to
# (load/results/gpu-2026-11-30.md measured 0.91 GiB).
CUDA_CONTEXT_BYTES = 1.0 * 2**30


def on_demand_names(settings: GatewaySettings) -> frozenset[str]:
    return frozenset(m.name for m in settings.models if m.on_demand is not None)


def swapped_names(settings: GatewaySettings) -> frozenset[str]:
    """The on-demand models that take turns on their GPUs: a `pinned` one never leaves, so
    the layout must hold it as it holds an always-on model."""
    return frozenset(
        m.name for m in settings.models if m.on_demand is not None and not m.on_demand.pinned
    )


def switchboard(settings: GatewaySettings, servers: Servers) -> Switchboard:
    """The on-demand models, each with the GPU shares it takes when running, and the shares the
    always-on models hold for ever; the swap policy and its batch windows."""
    specs = backend_specs(settings)
    names = on_demand_names(settings)
    models = [
        on_demand_model(model, settings, servers)
        for model in settings.models
        if model.on_demand is not None
    ]
    always_on = shares_per_gpu([s for s in specs if s.name not in names])
    policy, windows = swap_policy(settings)
    return Switchboard(models, always_on, policy=policy, windows=windows)


def on_demand_model(
    model: ModelSettings, settings: GatewaySettings, servers: Servers
) -> OnDemandModel:
    """One on-demand model: what it keeps on each GPU asleep (CUDA's context), and the host
    memory its weights take asleep at level 1 (all its replicas)."""
    memory = gpu_memory(settings)
    asleep = CUDA_CONTEXT_BYTES / memory if memory else 0.0
    config = on_demand_config(model, settings)
    return OnDemandModel(model.name, config, servers, asleep, model_weights(settings, model.name))


def model_weights(settings: GatewaySettings, name: str) -> float | None:
    """Bytes of weights all of a model's servers hold; None if one's size is unknown."""
    sizes = [weight_bytes(s) for s in backend_specs(settings) if s.name == name]
    if not sizes or any(size is None for size in sizes):
        return None
    return sum(size[0] for size in sizes if size is not None)


def swap_policy(settings: GatewaySettings) -> tuple[SwapPolicy, BatchWindows]:
    """`swaps`: the policy, and the batch window of each GPU group."""
    swaps = settings.swaps
    groups = tuple((frozenset(g.gpus), g.batch_window) for g in swaps.groups)
    return POLICIES[swaps.policy](), BatchWindows(swaps.batch_window, groups)


def on_demand_config(model: ModelSettings, settings: GatewaySettings) -> OnDemand:
    """`models[].on_demand`, but its `max_waiting`: that bounds the model's queue
    (``gateway.traffic.admission.queue_limits``)."""
    assert model.on_demand is not None
    full = settings.retry_after.loading
    fields = model.on_demand.model_dump(exclude={"costs", "max_waiting"})
    return OnDemand(**fields, costs=model.on_demand.first_costs(), retry_after_full=full)
