"""A pool picks the ready replica with the fewest requests in flight."""

from backends.lifecycle import BackendState
from backends.pool import Replica, ReplicaPool


def test_least_outstanding_ready_replica_wins() -> None:
    busy, idle, loading = Replica("a", in_flight=3), Replica("b", in_flight=1), Replica("c")
    loading.state = BackendState.LOADING
    pool = ReplicaPool("m", [busy, idle, loading])
    assert pool.pick() is idle


def test_no_ready_replica() -> None:
    pool = ReplicaPool("m", [Replica("a", state=BackendState.RESTARTING)])
    assert pool.pick() is None
    assert pool.loading
    pool.replicas[0].state = BackendState.FAILED
    assert not pool.loading
