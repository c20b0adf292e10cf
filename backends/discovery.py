"""Replicas found in DNS: every address a name resolves to is a replica of the model.

A Kubernetes headless Service resolves to the addresses of its ready pods, so the gateway
balances, checks and ejects each pod itself instead of seeing one Service address. The name is
resolved again every ``interval`` seconds:

- a new address joins as a replica in ``joining``; the health checker admits it once it passes
  its readiness checks (health, then the model list; runtime LoRA adapters restored first);
- an address gone from the answer is ``leaving``: it gets no new request, the ones in flight
  finish (waited for on their leases' releases), then it is removed;
- a failed or empty resolution keeps the last good set (DNS outages must not empty a model),
  logged once per change.

Needs no Kubernetes API access: DNS only.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from backends.health import HealthPolicy
from backends.life import ModelLife
from backends.lifecycle import BackendState
from backends.pool import Ejection, Replica

log = logging.getLogger("vllm_gateway.discovery")

# (host, port) -> the addresses it resolves to now; raises OSError when it does not resolve.
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class Watcher(Protocol):
    """Who checks a joining replica and admits it (``backends.health.HealthChecker``)."""

    def watch(self, life: ModelLife, replica: Replica, policy: HealthPolicy) -> None: ...

    def forget(self, replica: Replica) -> None: ...


async def resolve(host: str, port: int) -> list[str]:
    """The system resolver's answer (search domains apply, as for any pod's lookups)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True, slots=True)
class DnsName:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> DnsName:
        """`name:port` or `http(s)://name:port` (checked by the settings)."""
        parts = urlsplit(text if "://" in text else f"http://{text}")
        assert parts.hostname is not None and parts.port is not None
        return cls(parts.scheme, parts.hostname, parts.port)

    def address(self, ip: str) -> str:
        return f"[{ip}]:{self.port}" if ":" in ip else f"{ip}:{self.port}"

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Discovery:
    """Keeps one model's replicas equal to what its DNS name resolves to. It tells the model's
    life who joins and who leaves; the health checker reports on them meanwhile."""

    def __init__(
        self,
        life: ModelLife,
        name: DnsName,
        interval: float,
        health: Watcher,
        policy: HealthPolicy,
        *,
        api_key: str | None = None,
        ejection: Ejection | None = None,
        resolver: Resolver = resolve,
        on_removed: Callable[[Replica], Awaitable[None]] | None = None,
    ) -> None:
        """``on_removed``: called with each replica once it has left the pool (the gateway
        closes its connections to it)."""
        self.life = life
        self.name = name
        self.interval = interval
        self.health = health
        self.policy = policy
        self.api_key = api_key
        self.ejection = ejection or Ejection()
        self.resolver = resolver
        self.on_removed = on_removed
        self.members: dict[str, Replica] = {}  # address -> its replica, while not leaving
        self._failure: str | None = None  # the last resolution error, logged once
        self._task: asyncio.Task[None] | None = None
        self._leaving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.refresh()  # the first answer before the first request, when DNS is up
        self._task = asyncio.create_task(self._run(), name=f"discovery:{self.life.name}")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._leaving) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.refresh()

    async def refresh(self) -> None:
        """Resolve once and apply the answer; keep the last good set when it fails."""
        try:
            answer = await self.resolver(self.name.host, self.name.port)
            if not answer:
                raise OSError("no addresses")
        except OSError as exc:
            reason = str(exc) or type(exc).__name__
            if reason != self._failure:
                log.warning(
                    "%s: %s does not resolve (%s); keeping its %d replicas",
                    *(self.life.name, self.name, reason, len(self.members)),
                )
                self._failure = reason
            return
        if self._failure is not None:
            log.info("%s: %s resolves again", self.life.name, self.name)
            self._failure = None
        await self.apply([self.name.address(ip) for ip in answer])

    async def apply(self, addresses: list[str]) -> None:
        """``addresses``: the `ip:port` of each replica there should be, in the answer's order."""
        for address in addresses:
            if address not in self.members:
                await self._join(address)
        for address in [a for a in self.members if a not in addresses]:
            await self._leave(self.members.pop(address))

    async def _join(self, address: str) -> None:
        replica = Replica(
            url=f"{self.name.scheme}://{address}",
            api_key=self.api_key,
            state=BackendState.JOINING,
            ejection=self.ejection,
            identity=address,
            address=address,
        )
        self.members[address] = replica
        await self.life.join(replica)
        self.health.watch(self.life, replica, self.policy)
        log.info("%s: %s joins (admitted once ready)", self.life.name, address)

    async def _leave(self, replica: Replica) -> None:
        self.health.forget(replica)
        await self.life.move(BackendState.LEAVING, replica)
        log.info(
            "%s: %s left DNS, draining %d requests",
            *(self.life.name, replica.address, replica.in_flight),
        )
        task = asyncio.create_task(self._drain(replica), name=f"leave:{replica.address}")
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _drain(self, replica: Replica) -> None:
        await self.life.drained([replica])
        await self.life.remove(replica)
        log.info("%s: %s removed", self.life.name, replica.address)
        if self.on_removed is not None:
            await self.on_removed(replica)
