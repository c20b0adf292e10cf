"""Start-up turns per GPU: servers that share a GPU start one after another.

vLLM sizes its KV cache once, at start-up, from what the whole GPU holds while it profiles.
A neighbour that allocates during that time takes the share: two servers started together
on one GPU got very different caches (load/results/gpu-*.md). So a server on GPUs G waits
until no other server on any GPU of G is starting; it holds its turn until it is ready (its
profiling is then over), has failed, or gave up at its start-up timeout. Servers on disjoint
GPUs, and servers without GPUs (the CPU build), start in parallel as before.

Turns are taken in the order they were asked for (asyncio locks wake waiters first in, first
out), and a server on several GPUs takes their locks in ascending order, so two servers can
never each hold a GPU the other waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence


class GpuTurns:
    def __init__(self) -> None:
        self._locks: dict[int, asyncio.Lock] = {}
        self._holders: dict[int, str] = {}

    def holders(self, gpus: Sequence[int]) -> list[str]:
        """Who is starting on any of these GPUs now (for the progress lines)."""
        return sorted({self._holders[g] for g in gpus if g in self._holders})

    @contextlib.asynccontextmanager
    async def turn(self, who: str, gpus: Sequence[int]) -> AsyncIterator[None]:
        taken: list[int] = []
        try:
            for gpu in sorted(set(gpus)):
                await self._locks.setdefault(gpu, asyncio.Lock()).acquire()
                taken.append(gpu)
            self._holders.update(dict.fromkeys(taken, who))
            yield
        finally:
            for gpu in taken:
                self._holders.pop(gpu, None)
                self._locks[gpu].release()
