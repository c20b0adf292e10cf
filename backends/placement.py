"""Which model goes on which GPU, and the layouts that cannot work, found before anything starts.

vLLM's `gpu-memory-utilization` is a share of each GPU it runs on; two servers on one GPU must
leave room for each other (and for CUDA's own context), so their shares may add up to 0.95.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path

from backends.spec import VllmSpec

MAX_SHARE_PER_GPU = 0.95


def gpu_map(specs: Sequence[VllmSpec]) -> dict[int, list[tuple[str, float]]]:
    """GPU index -> [(model, memory share)], for the models that name GPUs."""
    layout: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for spec in specs:
        for gpu in spec.gpus:
            layout[gpu].append((spec.label, spec.memory_share))
    return dict(sorted(layout.items()))


def placement_problems(
    specs: Sequence[VllmSpec], gpu_count: int | None, on_demand: Collection[str] = ()
) -> list[str]:
    """What makes a layout unworkable. Always-on models must fit their GPUs together; an
    on-demand model (named in ``on_demand``) must fit beside the always-on ones, and may take
    turns with other on-demand models (``backends.swaps``)."""
    problems = []
    for spec in specs:
        share = spec.memory_share
        if not 0 < share <= 1:
            problems.append(f"{spec.label}: gpu-memory-utilization {share} is not in (0, 1]")
        if spec.gpus:
            parallel = spec.tensor_parallel_size * int(spec.args.get("pipeline-parallel-size", 1))
            if parallel != len(spec.gpus):
                problems.append(
                    f"{spec.label}: tensor-parallel-size x pipeline-parallel-size is {parallel} "
                    f"but {len(spec.gpus)} GPUs are listed ({_gpus(spec.gpus)})"
                )
        if gpu_count is not None:
            missing = [g for g in spec.gpus if g >= gpu_count]
            if missing:
                problems.append(
                    f"{spec.label}: GPU {_gpus(missing)} does not exist "
                    f"(this machine has {gpu_count}: 0-{gpu_count - 1})"
                )
    always_on = [s for s in specs if s.name not in on_demand]
    for gpu, tenants in gpu_map(always_on).items():
        total = sum(share for _, share in tenants)
        if len(tenants) > 1 and total > MAX_SHARE_PER_GPU + 1e-9:
            names = ", ".join(f"{name} {share:g}" for name, share in tenants)
            problems.append(
                f"GPU {gpu}: gpu-memory-utilization adds up to {total:.2f} > {MAX_SHARE_PER_GPU} "
                f"({names}); lower the shares, move a model or make some on-demand"
            )
    held = shares_per_gpu(always_on)
    for spec in specs:
        if spec.name not in on_demand:
            continue
        for gpu in spec.gpus:
            if held.get(gpu, 0.0) and held[gpu] + spec.memory_share > MAX_SHARE_PER_GPU + 1e-9:
                problems.append(
                    f"{spec.label}: on-demand, but its share {spec.memory_share:g} never fits "
                    f"GPU {gpu} beside the always-on models there ({held[gpu]:.2f})"
                )
    return problems


def shares_per_gpu(specs: Sequence[VllmSpec]) -> dict[int, float]:
    """GPU index -> the sum of the shares these servers take of it."""
    return {gpu: sum(share for _, share in tenants) for gpu, tenants in gpu_map(specs).items()}


def _gpus(gpus: Sequence[int]) -> str:
    return ",".join(str(g) for g in gpus)


# Bytes per parameter by weight format; quantized formats are approximate (scales and the
# unquantized embedding add a little).
_BYTES_PER_PARAM = {"fp8": 1.0, "int8": 1.0, "awq": 0.55, "gptq": 0.55, "bitsandbytes": 0.55}
_DTYPE_BYTES = {"float32": 4.0, "float": 4.0}
_PARAMS_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])")
HEADROOM = 0.9  # of a model's memory share, the weights may take at most this much


def weight_bytes(spec: VllmSpec) -> tuple[float, str] | None:
    """The model's weight size and how it was found: files on disk, else the name ("72B")."""
    local = Path(spec.model)
    if local.is_dir():
        index = local / "model.safetensors.index.json"
        if index.is_file():
            total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
            if isinstance(total, int):
                return float(total), "safetensors index"
        files = list(local.glob("*.safetensors"))
        if files:
            return float(sum(f.stat().st_size for f in files)), "safetensors files"
    match = _PARAMS_IN_NAME.search(local.name)
    if match is None:
        return None
    params = float(match.group(1)) * 1e9
    quant = str(spec.args.get("quantization", "")).lower()
    per_param = _BYTES_PER_PARAM.get(quant) or _DTYPE_BYTES.get(str(spec.args.get("dtype")), 2.0)
    return params * per_param, f"{match.group(1)}B parameters in the name"


def fit_warnings(specs: Sequence[VllmSpec], gpu_memory_bytes: float | None) -> list[str]:
    """Models whose weights clearly do not fit their GPUs' memory share."""
    if gpu_memory_bytes is None:
        return []
    warnings = []
    for spec in specs:
        size = weight_bytes(spec)
        if size is None or not spec.gpus:
            continue
        weights, source = size
        budget = gpu_memory_bytes * len(spec.gpus) * spec.memory_share * HEADROOM
        if weights > budget:
            warnings.append(
                f"{spec.label}: weights need ~{weights / 1e9:.0f} GB ({source}) but "
                f"{len(spec.gpus)} GPU(s) x {gpu_memory_bytes / 1e9:.0f} GB x "
                f"{spec.memory_share:g} leave ~{budget / 1e9:.0f} GB after KV-cache headroom; "
                "add GPUs, raise gpu-memory-utilization or quantize"
            )
    return warnings


def host_memory_bytes() -> float | None:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_host_memory(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """Bytes of host memory free for new use now (the kernel's MemAvailable), for deciding a
    level-1 sleep; None where the kernel does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def sleeper_memory(
    specs: Sequence[VllmSpec], level_one: Collection[str], host_bytes: float | None
) -> tuple[str | None, str | None]:
    """A line on the host memory that level-1 sleepers (named in ``level_one``) keep their
    weights in, all of them asleep at once, and a warning when the host cannot hold them."""
    sleepers = [s for s in specs if s.name in level_one]
    if not sleepers:
        return None, None
    sizes = [(s.label, weight_bytes(s)) for s in sleepers]
    known = sum(size[0] for _, size in sizes if size is not None)
    unknown = [label for label, size in sizes if size is None]
    line = f"level-1 sleepers keep ~{known / 1e9:.0f} GB of weights in host memory"
    line += f" (size unknown: {', '.join(unknown)})" if unknown else ""
    if host_bytes is None:
        return line, None
    line += f"; this host has {host_bytes / 1e9:.0f} GB"
    if known > HOST_SHARE_FOR_SLEEPERS * host_bytes:
        return line, (
            f"level-1 sleepers need ~{known / 1e9:.0f} GB of host memory, more than "
            f"{HOST_SHARE_FOR_SLEEPERS:.0%} of this host's {host_bytes / 1e9:.0f} GB; "
            "use sleep_level 2 for some"
        )
    return line, None


HOST_SHARE_FOR_SLEEPERS = 0.8  # of host memory, the most level-1 sleepers' weights may take
