"""Which model goes on which GPU, and the layouts that cannot work, found before anything starts.

vLLM's `gpu-memory-utilization` is a share of each GPU it runs on; two servers on one GPU must
leave room for each other (and for CUDA's own context), so their shares may add up to 0.95.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Sequence

from backends.spec import VllmSpec

MAX_SHARE_PER_GPU = 0.95


def gpu_map(specs: Sequence[VllmSpec]) -> dict[int, list[tuple[str, float]]]:
    """GPU index -> [(model, memory share)], for the models that name GPUs."""
    layout: dict[int, list[tuple[str, float]]] = defaultdict(list)
    for spec in specs:
        for gpu in spec.gpus:
            layout[gpu].append((spec.name, spec.memory_share))
    return dict(sorted(layout.items()))


def placement_problems(specs: Sequence[VllmSpec], gpu_count: int | None) -> list[str]:
    problems = []
    for spec in specs:
        share = spec.memory_share
        if not 0 < share <= 1:
            problems.append(f"{spec.name}: gpu-memory-utilization {share} is not in (0, 1]")
        if spec.gpus:
            parallel = spec.tensor_parallel_size * int(spec.args.get("pipeline-parallel-size", 1))
            if parallel != len(spec.gpus):
                problems.append(
                    f"{spec.name}: tensor-parallel-size x pipeline-parallel-size is {parallel} "
                    f"but {len(spec.gpus)} GPUs are listed ({_gpus(spec.gpus)})"
                )
        if gpu_count is not None:
            missing = [g for g in spec.gpus if g >= gpu_count]
            if missing:
                problems.append(
                    f"{spec.name}: GPU {_gpus(missing)} does not exist "
                    f"(this machine has {gpu_count}: 0-{gpu_count - 1})"
                )
    for gpu, tenants in gpu_map(specs).items():
        total = sum(share for _, share in tenants)
        if len(tenants) > 1 and total > MAX_SHARE_PER_GPU + 1e-9:
            names = ", ".join(f"{name} {share:g}" for name, share in tenants)
            problems.append(
                f"GPU {gpu}: gpu-memory-utilization adds up to {total:.2f} > {MAX_SHARE_PER_GPU} "
                f"({names}); lower the shares or move a model"
            )
    return problems


def visible_gpu_count() -> int | None:
    """How many GPUs this machine has, if that can be asked; None when it cannot be known."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([g for g in visible.split(",") if g.strip()])
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return len([line for line in out.splitlines() if line.strip()])


def _gpus(gpus: Sequence[int]) -> str:
    return ",".join(str(g) for g in gpus)
