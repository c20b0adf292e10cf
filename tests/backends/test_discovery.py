"""Replicas found in DNS, with an injected resolver and a recording watcher: who joins, who
leaves (drained, never cut), what a DNS outage changes (nothing), and how little affinity moves
when pods come and go."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from backends.discovery import Discovery, DnsName
from backends.health import HealthPolicy
from backends.life import ModelLife
from backends.lifecycle import BackendState as S
from backends.pool import Replica, ReplicaPool
from tests.helpers import Dns, until

NAME = DnsName.parse("vllm-chat-pods:8000")


class Watcher:
    """Records what the discovery hands to the health checker."""

    def __init__(self) -> None:
        self.watched: list[Replica] = []

    def watch(self, life: ModelLife, replica: Replica, policy: HealthPolicy) -> None:
        self.watched.append(replica)

    def forget(self, replica: Replica) -> None:
        self.watched.remove(replica)


def discovery(dns: Dns, **options: Any) -> tuple[Discovery, ReplicaPool, Watcher]:
    life, watcher = ModelLife("chat"), Watcher()
    found = Discovery(life, NAME, 60, watcher, HealthPolicy(), resolver=dns, **options)
    return found, ReplicaPool("chat", life.replicas), watcher


async def admit(found: Discovery, *replicas: Replica) -> None:
    """What the health checker has the model's life do once they pass."""
    for replica in replicas:
        await found.life.move(S.READY, replica)


def dns_asked(found: Discovery) -> list[tuple[str, int]]:
    assert isinstance(found.resolver, Dns)
    return found.resolver.asked


def addresses(pool: ReplicaPool) -> list[str | None]:
    return [r.address for r in pool.replicas]


async def test_new_addresses_join_unadmitted_and_are_watched_until_ready() -> None:
    found, pool, watcher = discovery(Dns("10.0.0.1", "10.0.0.2"))
    await found.refresh()
    assert dns_asked(found) == [("vllm-chat-pods", 8000)]
    assert addresses(pool) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert [r.url for r in pool.replicas] == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]
    assert all(r.state is S.JOINING for r in pool.replicas)
    assert watcher.watched == pool.replicas
    assert pool.pick() is None and pool.loading  # clients are told to retry soon


async def test_an_address_gone_from_dns_leaves_after_its_requests_end() -> None:
    dns = Dns("10.0.0.1", "10.0.0.2")
    found, pool, watcher = discovery(dns)
    await found.refresh()
    first, second = pool.replicas
    await admit(found, *pool.replicas)
    lease = second.lease(pool)  # a request in flight on the pod that will go
    dns.answer = ["10.0.0.1"]
    await found.refresh()
    assert second.state is S.LEAVING and second in pool.replicas  # drained, not cut
    assert watcher.watched == [first]
    assert [pool.pick() for _ in range(5)] == [first] * 5  # no new request goes there
    lease.release()
    await until(lambda: second not in pool.replicas, what="the drained pod removed")
    assert second.state is S.STOPPED and addresses(pool) == ["10.0.0.1:8000"]


async def test_whoever_holds_connections_hears_when_a_pod_is_gone_for_good() -> None:
    removed: list[str] = []

    async def forget(replica: Replica) -> None:
        removed.append(replica.url)

    dns = Dns("10.0.0.1", "10.0.0.2")
    found, _, _ = discovery(dns, on_removed=forget)
    await found.refresh()
    dns.answer = ["10.0.0.2"]
    await found.refresh()
    await until(lambda: removed == ["http://10.0.0.1:8000"], what="the hook called")


async def test_a_dns_outage_keeps_the_last_good_set_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = Dns("10.0.0.1", "10.0.0.2")
    found, pool, _ = discovery(dns)
    await found.refresh()
    caplog.set_level(logging.INFO, logger="vllm_gateway.discovery")
    for answer in (OSError("Name or service not known"), OSError("Name or service not known"), []):
        dns.answer = answer
        await found.refresh()
    dns.answer = ["10.0.0.1", "10.0.0.2"]
    await found.refresh()
    assert len(dns.asked) == 5 and addresses(pool) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "chat: vllm-chat-pods:8000 does not resolve (Name or service not known); "
        "keeping its 2 replicas",
        "chat: vllm-chat-pods:8000 does not resolve (no addresses); keeping its 2 replicas",
        "chat: vllm-chat-pods:8000 resolves again",
    ]


async def test_a_pod_that_comes_back_joins_again_as_a_new_replica() -> None:
    dns = Dns("10.0.0.1")
    found, pool, _ = discovery(dns)
    await found.refresh()
    (gone,) = pool.replicas
    dns.answer = ["10.0.0.2"]
    await found.refresh()
    dns.answer = ["10.0.0.1", "10.0.0.2"]
    await found.refresh()
    await until(lambda: gone not in pool.replicas, what="the old replica removed")
    assert sorted(a or "" for a in addresses(pool)) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    assert all(r.state is S.JOINING for r in pool.replicas)


def test_ipv6_addresses_are_bracketed() -> None:
    assert DnsName.parse("https://pods:8443").address("fd00::5") == "[fd00::5]:8443"


def sessions(pool: ReplicaPool) -> dict[str, str | None]:
    keys = [f"session-{i}" for i in range(2000)]
    return {k: (r.address if (r := pool.pick(affinity=k)) else None) for k in keys}


async def test_affinity_moves_only_the_sessions_of_a_pod_that_left_or_joined() -> None:
    dns = Dns(*(f"10.0.0.{i}" for i in range(1, 5)))
    found, pool, _ = discovery(dns)
    pool.policy = "affinity"
    await found.refresh()
    await admit(found, *pool.replicas)
    before = sessions(pool)
    dns.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.4"]  # 10.0.0.3 goes
    await found.refresh()
    await until(lambda: len(pool.replicas) == 3, what="10.0.0.3 removed")
    after = sessions(pool)
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k, pod in before.items() if pod == "10.0.0.3:8000"}
    assert 300 < len(moved) < 700  # its quarter, about
    dns.answer = ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5"]  # a new pod: in front
    await found.refresh()
    await admit(found, pool.replicas[-1])
    pool.replicas.insert(0, pool.replicas.pop())  # list order is not identity
    joined = sessions(pool)
    assert {k for k in after if after[k] != joined[k]} == {
        k for k, pod in joined.items() if pod == "10.0.0.5:8000"
    }


def test_configured_replicas_hash_by_url_so_their_order_does_not_matter() -> None:
    replicas = [Replica(url=f"http://r{i}:8000") for i in range(3)]
    pool = ReplicaPool("m", list(replicas), policy="affinity")
    first = {k: pool.pick(affinity=k) for k in (f"s{i}" for i in range(200))}
    pool.replicas.reverse()
    assert {k: pool.pick(affinity=k) for k in first} == first
