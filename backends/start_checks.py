"""What the supervisor checks and says around a start: the KV cache a server got against what
its slice should give, that a stopped tree's GPU memory is free before a restart, and what each
loading server is doing while others wait."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import httpx

from backends import kv_cache
from backends.gpu_turns import GpuTurns
from backends.gpus import gpu_memory_holders
from backends.lifecycle import BackendState
from backends.pool import Replica
from backends.process import BackendProcess
from backends.spec import VllmSpec

log = logging.getLogger("vllm_gateway.supervisor")


async def check_kv_cache(
    client: httpx.AsyncClient, spec: VllmSpec, replica: Replica, gpu_memory: float | None
) -> None:
    """Read the KV cache the server got and compare it with what its slice should give."""
    try:
        text = (await client.get(f"{replica.url}/metrics")).text
    except httpx.HTTPError:
        text = ""
    cache = kv_cache.KvCache(
        expected_bytes=kv_cache.expected_bytes(spec, gpu_memory),
        actual_tokens=kv_cache.tokens_from_metrics(text),
        bytes_per_token=kv_cache.bytes_per_token(spec),
    )
    if cache.expected_bytes is None and cache.actual_tokens is None:
        return  # nothing known on either side: nothing to show
    replica.kv_cache = cache
    if cache.short:
        log.warning(
            "%s: KV cache is short: %s. A neighbour on GPU %s may have allocated while it "
            "profiled memory; it serves fewer concurrent tokens than its slice was sized for",
            spec.label,
            cache.describe(),
            ",".join(str(g) for g in spec.gpus) or "-",
        )
    else:
        log.info("%s: KV cache %s", spec.label, cache.describe())


async def gpu_memory_freed(label: str, pids: list[int], timeout: float) -> None:
    """Before a restart, wait until no process of the old tree holds GPU memory."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        holders = await gpu_memory_holders()
        held = sorted(set(pids) & set(holders or {}))
        if not held:
            if said:
                log.info("%s: GPU memory of the old server is free", label)
            return
        if time.monotonic() > deadline:
            log.error(
                "%s: pids %s still hold GPU memory after %.0fs; restarting anyway",
                label,
                held,
                timeout,
            )
            return
        if not said:
            log.warning("%s: waiting for pids %s to free their GPU memory", label, held)
            said = True
        await asyncio.sleep(1.0)


async def report_progress(
    servers: Iterable[tuple[VllmSpec, Replica, BackendProcess]], turns: GpuTurns, every: float
) -> None:
    """While anything loads, say every few seconds what each backend is doing."""
    servers = list(servers)
    while True:
        await asyncio.sleep(every)
        for spec, replica, process in servers:
            state = replica.state
            if state is BackendState.WAITING:
                gpus = ",".join(str(g) for g in spec.gpus)
                holders = ", ".join(turns.holders(spec.gpus)) or "another model"
                elapsed = time.monotonic() - replica.state_since
                log.info(
                    "%s: waiting %.0fs for its turn on GPU %s (%s is starting there)",
                    spec.label,
                    elapsed,
                    gpus,
                    holders,
                )
            elif state in (BackendState.LOADING, BackendState.RESTARTING):
                elapsed = time.monotonic() - process.started_at
                last = (process.tail(1) or [""])[0][:160]
                log.info("%s: %s for %.0fs | %s", spec.label, state, elapsed, last)
