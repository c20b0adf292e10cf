"""What nvidia-smi says about this machine's GPUs: how many, how big, and who holds memory.

Every question returns None when it cannot be asked (no nvidia-smi, no driver), so callers
decide what an unknown means; nothing here guesses.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

NVIDIA_SMI_TIMEOUT = 10.0


def visible_gpu_count() -> int | None:
    """How many GPUs this machine has, if that can be asked; None when it cannot be known."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([g for g in visible.split(",") if g.strip()])
    indices = _query(["--query-gpu=index"])
    return None if indices is None else len(indices)


def visible_gpu_memory() -> float | None:
    """Bytes of memory on GPU 0, if nvidia-smi can tell (it reports MiB)."""
    sizes = _query(["--query-gpu=memory.total"])
    return float(sizes[0]) * 2**20 if sizes else None


async def gpu_memory_holders() -> dict[int, float] | None:
    """pid -> MiB of GPU memory, for every process that holds some; None when unknown."""
    lines = await asyncio.to_thread(_query, ["--query-compute-apps=pid,used_memory"])
    if lines is None:
        return None
    holders: dict[int, float] = {}
    for line in lines:
        pid, _, used = line.partition(",")
        try:
            holders[int(pid)] = float(used.strip() or 0)
        except ValueError:
            continue  # "[N/A]" or a header from an odd driver
    return holders


def _query(args: list[str]) -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", *args, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]
