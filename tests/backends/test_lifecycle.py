"""The backend state machine: its writers move along the table, nothing else gets through,
and a request's lease on a replica is given back exactly once."""

from __future__ import annotations

import pytest

from backends.lifecycle import TRANSITIONS, BackendState, InvalidTransition, Level, check
from backends.pool import Replica, ReplicaPool

S = BackendState


def test_a_spawned_server_goes_from_stopped_through_its_turn_to_ready_and_back() -> None:
    replica = Replica(url="", state=S.STOPPED)
    for state in (S.WAITING, S.LOADING, S.READY, S.RESTARTING, S.WAITING, S.RESTARTING, S.READY):
        replica.move(state)
        assert replica.state is state
        assert (replica.ready_since is not None) == (state is S.READY)
    replica.move(S.STOPPED)  # from anywhere
    assert replica.ready_since is None


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (S.STOPPED, S.READY),
        (S.FAILED, S.LOADING),
        (S.UNHEALTHY, S.RESTARTING),
        (S.READY, S.LOADING),
    ],
)
def test_a_move_the_table_does_not_list_is_refused(start: S, target: S) -> None:
    replica = Replica(url="", state=start)
    with pytest.raises(InvalidTransition, match=f"{start} -> {target}"):
        replica.move(target)
    assert replica.state is start


def test_every_state_is_in_the_table_at_one_level_or_both_and_moves_stay_within_it() -> None:
    replica, model = TRANSITIONS[Level.REPLICA], TRANSITIONS[Level.MODEL]
    assert set(replica) | set(model) == set(BackendState)
    for table in (replica, model):
        assert all(targets <= set(table) for targets in table.values())
    assert S.STARTING not in replica and S.UNHEALTHY not in model


def test_a_model_moves_along_its_own_level_of_the_table() -> None:
    check(S.STOPPED, S.STARTING, Level.MODEL)
    check(S.ASLEEP, S.STOPPED, Level.MODEL)  # from anywhere
    check(S.STOPPED, S.ASLEEP, Level.MODEL)  # its servers adopted asleep after a restart
    check(S.STOPPED, S.ASLEEP)  # one such server
    with pytest.raises(InvalidTransition, match="model stopped -> ready"):
        check(S.STOPPED, S.READY, Level.MODEL)
    with pytest.raises(InvalidTransition, match="replica stopped -> starting"):
        check(S.STOPPED, S.STARTING)


def test_a_lease_counts_a_request_and_its_stream_once() -> None:
    replica = Replica(url="http://r")
    pool = ReplicaPool("m", [replica])
    with replica.lease(pool) as lease:
        assert replica.in_flight == 1
        lease.stream()
        lease.stream()
        assert pool.open_streams == 1
        lease.release()  # early, as the relay does on a failed send
        assert (replica.in_flight, pool.open_streams) == (0, 0)
    assert (replica.in_flight, pool.open_streams) == (0, 0)  # not given back twice
