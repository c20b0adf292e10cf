"""vLLM's own view of its load, scraped from each replica's /metrics off the request path.

For pools balanced by ``vllm_metrics`` or ``prefix``: every ``interval`` seconds each
replica's `vllm:num_requests_running`, `vllm:num_requests_waiting` and
`vllm:kv_cache_usage_perc` are read (summed over label sets) into ``Replica.load``, with its
prefix cache's counters (`vllm:prefix_cache_hits_total`, `vllm:prefix_cache_queries_total`)
for the status page. A replica that does not answer keeps no load
figure, so it is weighed by the gateway's in-flight count alone.
"""

from __future__ import annotations

import asyncio
import re

import httpx

from backends.http import client_for
from backends.pool import Replica, ReplicaPool, VllmLoad

_SAMPLE = re.compile(
    rb"^vllm:(num_requests_running|num_requests_waiting|kv_cache_usage_perc"
    rb"|prefix_cache_hits_total|prefix_cache_queries_total)(?:\{[^}]*\})? "
    rb"([0-9.eE+-]+)",
    re.MULTILINE,
)


def parse_load(text: bytes) -> VllmLoad | None:
    found: dict[bytes, float] = {}
    for name, value in _SAMPLE.findall(text):
        found[name] = found.get(name, 0.0) + float(value)
    if b"num_requests_running" not in found:
        return None
    return VllmLoad(
        running=found[b"num_requests_running"],
        waiting=found.get(b"num_requests_waiting", 0.0),
        kv_cache_usage=found.get(b"kv_cache_usage_perc", 0.0),
        prefix_cache_hits=found.get(b"prefix_cache_hits_total", 0.0),
        prefix_cache_queries=found.get(b"prefix_cache_queries_total", 0.0),
    )


class LoadScraper:
    """Scrapes the replicas of ``pools`` (those balanced by vLLM's metrics), as they are at each
    round: discovered pods come and go."""

    def __init__(
        self, pools: list[ReplicaPool], interval: float = 1.0, connect_timeout: float = 1.0
    ) -> None:
        self.pools = pools
        self.interval = interval
        self.connect_timeout = connect_timeout
        self._task: asyncio.Task[None] | None = None
        self._started = False

    async def start(self) -> None:
        self._started = True
        if self.pools:
            self._task = asyncio.create_task(self._run(), name="vllm-load-scraper")

    def use(self, pools: list[ReplicaPool]) -> None:
        """Scrape ``pools`` from the next round on (a reload changed how models balance)."""
        self.pools = pools
        if pools and self._started and self._task is None:
            self._task = asyncio.create_task(self._run(), name="vllm-load-scraper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        clients: dict[Replica, httpx.AsyncClient] = {}
        try:
            while True:
                replicas = [r for pool in self.pools for r in pool.replicas]
                for gone in clients.keys() - set(replicas):
                    await clients.pop(gone).aclose()
                for replica in replicas:
                    if replica not in clients:
                        # A scrape never outlasts its round, however long connects may take.
                        connect = min(self.connect_timeout, self.interval)
                        timeout = httpx.Timeout(self.interval, connect=connect)
                        clients[replica] = client_for(replica, timeout)
                await asyncio.gather(*(self._scrape(clients[r], r) for r in replicas))
                await asyncio.sleep(self.interval)
        finally:
            await asyncio.gather(*(c.aclose() for c in clients.values()))

    async def _scrape(self, client: httpx.AsyncClient, replica: Replica) -> None:
        if not replica.url:
            return
        try:
            response = await client.get(replica.url + "/metrics")
            replica.load = parse_load(response.content) if response.status_code == 200 else None
        except httpx.HTTPError:
            replica.load = None
