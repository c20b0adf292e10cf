"""How a pool chooses among its replicas, and when it leaves one out."""

from __future__ import annotations

from collections import Counter

from backends.lifecycle import BackendState
from backends.pool import Ejection, Replica, ReplicaPool, VllmLoad
from backends.vllm_load import parse_load


def pool(policy: str = "least_outstanding", n: int = 3) -> ReplicaPool:
    return ReplicaPool("m", [Replica(url=f"http://r{i}") for i in range(n)], policy=policy)  # type: ignore[arg-type]


def test_least_outstanding_takes_the_least_busy_ready_replica() -> None:
    p = pool()
    p.replicas[0].in_flight, p.replicas[1].in_flight, p.replicas[2].in_flight = 3, 1, 0
    p.replicas[2].state = BackendState.UNHEALTHY
    assert p.pick() is p.replicas[1]
    assert p.pick(exclude=[p.replicas[1]]) is p.replicas[0]


def test_vllm_metrics_avoids_the_replica_vllm_says_is_loaded() -> None:
    p = pool("vllm_metrics", 2)
    p.replicas[0].load = VllmLoad(running=6, waiting=2, kv_cache_usage=0.5)
    p.replicas[1].load = VllmLoad(running=1, waiting=0, kv_cache_usage=0.1)
    p.replicas[1].in_flight = 4  # the gateway's own requests count too
    assert p.pick() is p.replicas[1]  # 1 + 0.4 + 4 < 6 + 4 + 2
    p.replicas[1].in_flight = 12  # 12 + 1.4 > 12
    assert p.pick() is p.replicas[0]


def test_affinity_keeps_a_session_on_one_replica_and_moves_only_the_lost_ones() -> None:
    p = pool("affinity", 3)
    sessions = [f"user-{i}" for i in range(300)]
    before = {s: p.pick(affinity=s) for s in sessions}
    assert all(p.pick(affinity=s) is before[s] for s in sessions)  # stable
    assert min(Counter(map(id, before.values())).values()) > 60  # spread over all three
    lost = p.replicas[0]
    lost.state = BackendState.FAILED
    after = {s: p.pick(affinity=s) for s in sessions}
    moved = [s for s in sessions if after[s] is not before[s]]
    assert moved and all(before[s] is lost for s in moved)  # only the lost replica's sessions


def test_failed_requests_eject_a_replica_for_a_cool_down() -> None:
    replica = Replica(url="http://r", ejection=Ejection(after=2, seconds=60))
    replica.note_failure()
    assert replica.ready
    replica.note_failure()
    assert not replica.ready
    replica.note_success()
    assert replica.ready


VLLM_METRICS = b"""# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny-chat"} 3.0
vllm:num_requests_waiting{engine="0",model_name="tiny-chat"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny-chat"} 0.25
vllm:num_requests_running_total_fake 99
"""


def test_load_is_read_from_vllm_metrics_text() -> None:
    assert parse_load(VLLM_METRICS) == VllmLoad(running=3, waiting=2, kv_cache_usage=0.25)
    assert parse_load(b"# nothing here\n") is None
