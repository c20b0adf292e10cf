"""Adoption against the fake vLLM, spawned as a real one would be: a server a stopped gateway
left running is taken over without a start, or refused and ended, and one nobody adopts ends
itself. Real vLLM goes the same way in tests/integration/test_restart.py."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends import adoption
from backends.kept import KeptServers, spec_hash
from backends.lifecycle import BackendState
from backends.pool import Replica
from backends.proctree import group_members
from backends.state_dir import ServerRecord, StateDir
from backends.supervisor import Supervisor
from tests.backends.test_supervisor import FAST, fake_spec
from tests.helpers import until
from tests.servers import alive

pytestmark = pytest.mark.servers  # starts processes on loopback

KEEP = 30.0


async def ready_supervisor(tmp_path: Path, keep: float = KEEP, **env: str) -> Supervisor:
    sup = Supervisor(
        [fake_spec(**env)],
        log_dir=tmp_path,
        timings=FAST,
        state_dir=StateDir(tmp_path / "state"),
        keep_backends=keep,
    )
    await sup.start()
    await until(lambda: sup.replicas("m")[0].state is BackendState.READY, what="ready")
    return sup


@pytest.fixture
async def left(tmp_path: Path) -> AsyncIterator[ServerRecord]:
    """The record of a server whose gateway stopped and left it running."""
    sup = await ready_supervisor(tmp_path)
    await sup.stop()
    (record,) = StateDir(tmp_path / "state").records()
    assert alive(record.pgid)
    yield record
    for leftover in StateDir(tmp_path / "state").records():
        await adoption.end_recorded(leftover, 2)
    await adoption.end_recorded(record, 2)


async def test_a_server_left_running_is_adopted_without_a_start(
    tmp_path: Path, left: ServerRecord
) -> None:
    sup = await ready_supervisor(tmp_path)
    try:
        backend = sup.backends["m"]
        assert backend.process.pid == left.pgid
        assert backend.replica.url == left.url and backend.replica.api_key == left.api_key
        log = (tmp_path / "m.log").read_text()
        assert log.count("starting:") == 1 and "adopted: reaper pid" in log
    finally:
        await sup.stop()


async def test_a_server_started_with_another_environment_is_ended_then_started_fresh(
    tmp_path: Path, left: ServerRecord
) -> None:
    sup = await ready_supervisor(tmp_path, FAKE_VLLM_CHANGED="1")
    try:
        assert not group_members(left.pgid)
        assert sup.backends["m"].process.pid != left.pgid
    finally:
        await sup.stop()


async def test_a_gateway_that_keeps_nothing_ends_what_the_last_one_left(
    tmp_path: Path, left: ServerRecord
) -> None:
    sup = await ready_supervisor(tmp_path, keep=0)
    try:
        assert not group_members(left.pgid)
    finally:
        await sup.stop()
    assert StateDir(tmp_path / "state").records() == []  # nothing kept: nothing recorded


async def test_gateways_that_spawn_nothing_share_a_directory_the_last_one_left(
    tmp_path: Path, left: ServerRecord
) -> None:
    """A spawn-mode gateway ran here (the demo, say); then two connect-mode gateways start in
    the same directory: the first ends what was left, and neither holds the directory."""
    first, second = (
        Supervisor([], log_dir=tmp_path, timings=FAST, state_dir=StateDir(tmp_path / "state"))
        for _ in range(2)
    )
    await first.start()
    await second.start()  # StateDirInUse, were the directory held by the first
    try:
        assert not group_members(left.pgid)
        assert StateDir(tmp_path / "state").records() == []
    finally:
        await second.stop()
        await first.stop()


async def test_adoption_refuses_a_server_started_with_another_command(left: ServerRecord) -> None:
    with pytest.raises(adoption.Refused, match="another command or environment"):
        await adoption.adopt(left, "m", spec_hash(fake_spec(FAKE_VLLM_CHANGED="1")))


async def test_adoption_refuses_a_pid_that_is_now_another_process(left: ServerRecord) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as stranger:
        try:
            reused = dataclasses.replace(left, pgid=stranger.pid)
            with pytest.raises(adoption.Refused, match="gone or the pid is another process"):
                await adoption.adopt(reused, "m", left.command_hash)
            await adoption.end_recorded(reused, 2)
            assert stranger.poll() is None  # never signalled
        finally:
            stranger.kill()


async def test_adoption_refuses_a_server_that_does_not_answer(left: ServerRecord) -> None:
    elsewhere = dataclasses.replace(left, port=1)  # nothing listens on port 1
    with pytest.raises(adoption.Refused, match="does not answer"):
        await adoption.adopt(elsewhere, "m", left.command_hash)


async def test_adoption_refuses_a_server_that_does_not_take_the_recorded_key(
    left: ServerRecord,
) -> None:
    with pytest.raises(adoption.Refused, match="with its key"):
        await adoption.adopt(dataclasses.replace(left, api_key="sk-wrong"), "m", left.command_hash)


async def test_adoption_refuses_a_server_whose_reaper_is_gone(left: ServerRecord) -> None:
    await adoption.end_recorded(left, 2)
    with pytest.raises(adoption.Refused):
        await adoption.adopt(left, "m", left.command_hash)


async def test_a_released_server_nobody_adopts_ends_itself(tmp_path: Path) -> None:
    sup = await ready_supervisor(tmp_path, keep=1)
    tree = sup.backends["m"].process.tree()
    await sup.stop()
    assert any(alive(pid) for pid in tree)  # waiting to be adopted
    await until(lambda: not any(alive(pid) for pid in tree), 30, "the tree to end itself")


async def test_with_keep_backends_zero_the_servers_stop_with_the_gateway(tmp_path: Path) -> None:
    sup = await ready_supervisor(tmp_path, keep=0)
    tree = sup.backends["m"].process.tree()
    await sup.stop()
    assert not any(alive(pid) for pid in tree)


async def test_a_tree_whose_gateway_and_reaper_were_killed_together_is_ended_at_the_next_start(
    tmp_path: Path,
) -> None:
    """What `pkill -9` of the gateway and the reaper leaves: the server lives on under init,
    in the recorded group. The next gateway finds the group by its record and ends it."""
    from backends.proctree import start_time

    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    reaper = subprocess.Popen(
        [sys.executable, "-m", "backends.reaper", "--", *sleeper], start_new_session=True
    )
    started = start_time(reaper.pid)
    assert started is not None
    await until(lambda: len(group_members(reaper.pid)) == 2)
    StateDir(tmp_path / "state").save(ServerRecord("m", reaper.pid, started, "sk-k", "x", port=1))
    reaper.kill()
    reaper.wait()
    (orphan,) = group_members(reaper.pid)
    sup = await ready_supervisor(tmp_path, keep=0)
    try:
        assert not alive(orphan)
    finally:
        await sup.stop()


async def test_a_server_on_a_unix_socket_is_adopted_on_its_socket(tmp_path: Path) -> None:
    def supervisor() -> Supervisor:
        spec = dataclasses.replace(fake_spec(), unix_socket=True)
        state = StateDir(tmp_path / "state")
        return Supervisor(
            [spec], log_dir=tmp_path, timings=FAST, state_dir=state, keep_backends=KEEP
        )

    first = supervisor()
    await first.start()
    await until(lambda: first.replicas("m")[0].state is BackendState.READY)
    socket_path = first.replicas("m")[0].uds
    await first.stop()
    second = supervisor()
    await second.start()
    try:
        replica = second.replicas("m")[0]
        await until(lambda: replica.state is BackendState.READY)
        assert replica.uds == socket_path
        assert second.backends["m"].process.pid == first.backends["m"].process.pid
        response = await second.backends["m"].client.get(f"{replica.url}/health")
        assert response.status_code == 200
    finally:
        await second.stop()
        for record in StateDir(tmp_path / "state").records():
            await adoption.end_recorded(record, 2)


async def test_each_replica_is_adopted_as_itself(tmp_path: Path) -> None:
    def supervisor() -> Supervisor:
        specs = [dataclasses.replace(fake_spec(), replica=i) for i in (0, 1)]
        state = StateDir(tmp_path / "state")
        return Supervisor(
            specs, log_dir=tmp_path, timings=FAST, state_dir=state, keep_backends=KEEP
        )

    first = supervisor()
    await first.start()
    await until(lambda: all(r.state is BackendState.READY for r in first.replicas("m")))
    pids = {label: b.process.pid for label, b in first.backends.items()}
    await first.stop()
    second = supervisor()
    await second.start()
    try:
        await until(lambda: all(r.state is BackendState.READY for r in second.replicas("m")))
        assert {label: b.process.pid for label, b in second.backends.items()} == pids
        assert set(pids) == {"m#0", "m#1"}
    finally:
        await second.stop()
        for record in StateDir(tmp_path / "state").records():
            await adoption.end_recorded(record, 2)


@pytest.mark.parametrize(
    ("model", "server", "kept"),
    [
        (BackendState.READY, BackendState.READY, True),  # always-on, or on demand and serving
        (BackendState.ASLEEP, BackendState.ASLEEP, True),  # on demand, asleep
        (BackendState.STARTING, BackendState.READY, False),  # its model is still starting
        (BackendState.DRAINING, BackendState.DRAINING, False),
        (BackendState.SLEEPING, BackendState.SLEEPING, False),
        (BackendState.SLEEPING, BackendState.ASLEEP, False),  # its neighbour is falling asleep
        (BackendState.WAKING, BackendState.READY, False),
        (BackendState.READY, BackendState.RESTARTING, False),
        (BackendState.STOPPED, BackendState.STOPPED, False),  # a stopped model: nothing to keep
    ],
)
def test_a_server_is_kept_only_where_its_model_serves_or_sleeps_not_mid_way(
    tmp_path: Path, model: BackendState, server: BackendState, kept: bool
) -> None:
    keeping = KeptServers(StateDir(tmp_path), keep_backends=KEEP, grace=1)
    replica = Replica(url="http://r", state=server)
    assert keeping.keeps(replica, True, model) is kept
    assert not keeping.keeps(replica, False, model)  # a dead one never
    assert not KeptServers(StateDir(tmp_path), 0, 1).keeps(replica, True, model)
