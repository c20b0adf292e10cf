"""Is a vLLM server ready to serve? Both /health and the model list must say so.

vLLM has been seen answering /health 200 before its OpenAI routes serve, so readiness also
needs /v1/models to list the served name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import httpx

from backends.adapters import AdapterBook, restore
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Replica

log = logging.getLogger("vllm_gateway.health")
ADMITTABLE = frozenset({BackendState.UNHEALTHY, BackendState.JOINING})  # after passed checks
CALL_TIMEOUT = 5.0  # one call (each check is bounded by its policy's timeout as well)
CONNECT_TIMEOUT = 5.0  # the config's `timeouts.connect` where it has one


async def is_ready(client: httpx.AsyncClient, url: str, name: str, api_key: str | None) -> bool:
    return await served(client, url, name, api_key) is not None


async def served(
    client: httpx.AsyncClient, url: str, name: str, api_key: str | None
) -> frozenset[str] | None:
    """The LoRA adapters the server serves on top of ``name`` (their /v1/models cards name it
    as `parent`), or None while it is not ready."""
    try:
        health = await client.get(f"{url}/health")
        if health.status_code != 200:
            return None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        models = await client.get(f"{url}/v1/models", headers=headers)
        if models.status_code != 200:
            return None
        cards = [c for c in models.json().get("data", []) if isinstance(c, dict)]
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if not any(card.get("id") == name for card in cards):
        return None
    return frozenset(str(c["id"]) for c in cards if c.get("parent") == name and c.get("id") != name)


async def is_healthy(client: httpx.AsyncClient, url: str) -> bool:
    try:
        return (await client.get(f"{url}/health")).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    interval: float = 5.0
    timeout: float = 2.0
    unhealthy_threshold: int = 2
    healthy_threshold: int = 2


class HealthChecker:
    """Active health checks of servers the gateway connects to (it does not own them).

    A ready replica failing ``unhealthy_threshold`` checks in a row is taken out; any replica
    that is out is admitted again after ``healthy_threshold`` passed checks in a row, where a
    pass needs /health and the model list (a restarted vLLM answers /health before it serves;
    the list also says which LoRA adapters it serves). The checker only reports: each
    replica's life makes the moves, and refuses one whose state changed meanwhile.
    """

    def __init__(
        self,
        replicas: list[tuple[ModelLife, Replica, HealthPolicy]],
        adapter_book: AdapterBook | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        """``adapter_book``: runtime LoRA adapters, given to a replica before it is admitted
        again; ``connect_timeout``: seconds to open a connection to a replica."""
        self.replicas = replicas
        self.adapters = adapter_book or AdapterBook()
        self.connect_timeout = connect_timeout
        self._tasks: dict[Replica, asyncio.Task[None]] = {}
        self._policies: dict[Replica, HealthPolicy] = {}
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        timeout = httpx.Timeout(CALL_TIMEOUT, connect=self.connect_timeout)
        self._client = httpx.AsyncClient(timeout=timeout)
        for life, replica, policy in self.replicas:
            self.watch(life, replica, policy)

    def watch(self, life: ModelLife, replica: Replica, policy: HealthPolicy) -> None:
        """Check ``replica`` from now on (a discovered pod that joined, or one from the config)."""
        self.forget(replica)
        self._policies[replica] = policy
        self._tasks[replica] = asyncio.create_task(
            self._watch(life, replica, policy), name=f"health:{replica.url}"
        )

    def reconfigure(self, life: ModelLife, policy: HealthPolicy) -> None:
        """Check the model's replicas by ``policy`` from now on (a reload changed it)."""
        for replica in life.replicas:
            if replica in self._tasks and self._policies.get(replica) != policy:
                self.watch(life, replica, policy)

    def forget(self, replica: Replica) -> None:
        """Stop checking ``replica``: from here on its state is its discovery's to change."""
        self._policies.pop(replica, None)
        task = self._tasks.pop(replica, None)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()

    async def _watch(self, life: ModelLife, replica: Replica, policy: HealthPolicy) -> None:
        assert self._client is not None
        name = life.name
        passed = failed = 0
        while True:
            began = time.monotonic()
            try:
                async with asyncio.timeout(policy.timeout):
                    # The model list too, not just /health: it says which adapters it serves.
                    found = await served(self._client, replica.url, name, replica.api_key)
            except TimeoutError:
                found = None
            ok = found is not None
            if found is not None:
                replica.adapters = found
            replica.health_latency = time.monotonic() - began
            passed, failed = (passed + 1, 0) if ok else (0, failed + 1)
            if replica.state is BackendState.READY and failed >= policy.unhealthy_threshold:
                ready = {BackendState.READY}
                if await life.move(BackendState.UNHEALTHY, replica, expected=ready) is (
                    BackendState.UNHEALTHY
                ):
                    log.warning(
                        "%s at %s: unhealthy after %d failed checks", name, replica.url, failed
                    )
            elif replica.state in ADMITTABLE and passed >= policy.healthy_threshold:
                await self._admit(life, replica)
            await asyncio.sleep(policy.interval)

    async def _admit(self, life: ModelLife, replica: Replica) -> None:
        assert self._client is not None
        if wanted := self.adapters.of(life.name):
            moved = await life.move(BackendState.RESTORING, replica, expected=ADMITTABLE)
            if moved is not BackendState.RESTORING:
                return  # it is leaving
            await restore(self._client, replica, wanted)
        admittable = {*ADMITTABLE, BackendState.RESTORING}
        if await life.move(BackendState.READY, replica, expected=admittable) is BackendState.READY:
            replica.note_success()
            log.info("%s at %s: ready, admitted", life.name, replica.url)
