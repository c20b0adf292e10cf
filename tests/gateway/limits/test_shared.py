"""The table the workers of one host share: one bucket and one in-flight count per key, across
real processes, and a dead worker's slots given back."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import RateLimited
from gateway.keys import ApiKey
from gateway.limits.build import limits_store
from gateway.limits.shared import (
    LIMITS_TABLE_ENV,
    SharedLimits,
    SharedTable,
    attach_shared_table,
    create_shared_table,
)
from tests.servers import subprocess_env

WORKER = str(Path(__file__).with_name("table_worker.py"))


def key(name: str = "k", rpm: int | None = None, concurrent: int | None = None) -> ApiKey:
    return ApiKey(name, b"d" * 32, None, requests_per_minute=rpm, max_concurrent=concurrent)


@pytest.fixture
def table(tmp_path: Path) -> Iterator[SharedTable]:
    table = create_shared_table(workers=3, directory=tmp_path)
    yield table
    table.close()


def stopped_clock() -> float:
    return 0.0


@pytest.fixture
def memory_table() -> Iterator[SharedTable]:
    """As the control plane makes it: a memory file its workers inherit."""
    table = create_shared_table(workers=3)
    yield table
    table.close()


def attach(table: SharedTable, worker: int) -> SharedLimits:
    return attach_shared_table(table.where, worker, clock=stopped_clock)


def test_workers_draw_from_one_bucket(table: SharedTable) -> None:
    first, second = attach(table, 0), attach(table, 1)
    slow = key(rpm=3)
    first.admit(slow)
    first.admit(slow)
    second.admit(slow)
    for worker in (first, second):
        with pytest.raises(RateLimited):
            worker.admit(slow)


def test_max_concurrent_counts_every_workers_requests(table: SharedTable) -> None:
    first, second = attach(table, 0), attach(table, 1)
    two = key(concurrent=2)
    assert first.admit(two) and second.admit(two)
    with pytest.raises(RateLimited):
        first.admit(two)
    second.release(two)
    assert first.admit(two)
    assert first.in_flight(two) == second.in_flight(two) == 2


def test_a_dead_workers_slots_are_given_back_by_the_control_plane(table: SharedTable) -> None:
    dying, living = attach(table, 0), attach(table, 1)
    one = key(concurrent=1)
    dying.admit(one)
    with pytest.raises(RateLimited):
        living.admit(one)
    table.forget_worker(0)
    assert living.admit(one)


def test_a_key_beyond_a_full_table_is_counted_by_each_worker_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    table = create_shared_table(workers=2, directory=tmp_path, rows=1)
    try:
        first, second = attach(table, 0), attach(table, 1)
        first.admit(key("in-the-table", concurrent=1))
        first.admit(key("beyond", concurrent=1))  # the one row is taken
        assert second.admit(key("beyond", concurrent=1))  # not shared: its own count
        assert "is full" in caplog.text
    finally:
        table.close()


def test_a_worker_attaches_from_the_environment_the_control_plane_gives_it(
    table: SharedTable, memory_table: SharedTable
) -> None:
    for either in (table, memory_table):
        store = limits_store(None, either.env(2))
        assert isinstance(store, SharedLimits)
        assert store.admit(key("k", concurrent=1))
        assert attach(either, 0).in_flight(key("k", concurrent=1)) == 1  # the same table
    assert limits_store(None, {}).__class__.__name__ == "LocalLimits"
    with pytest.raises(ValueError, match="columns"):
        table.env(3)
    with pytest.raises(ValueError, match="worker index"):
        limits_store(None, {LIMITS_TABLE_ENV: str(table.path)})


def test_a_table_in_a_file_is_attached_by_its_path_and_removed_at_close(tmp_path: Path) -> None:
    table = create_shared_table(workers=1, directory=tmp_path)
    assert table.path is not None and table.where == str(table.path) and not table.pass_fds
    attach_shared_table(table.path, 0).admit(key(concurrent=1))
    table.close()
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_no_table_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(bytes(4096))
    with pytest.raises(ValueError, match="not a limits table"):
        attach_shared_table(other, 0)


class Workers:
    """Real worker processes on one table, started together."""

    def __init__(self, table: SharedTable, count: int, tries: int, rpm: int, concurrent: int):
        limits = [str(tries), str(rpm), str(concurrent)]
        self.procs = [  # started as the control plane starts its workers
            subprocess.Popen(
                [sys.executable, WORKER, *limits],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=subprocess_env(**table.env(i)),
                pass_fds=table.pass_fds,
            )
            for i in range(count)
        ]
        for proc in self.procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"

    def go(self) -> list[int]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [int(proc.stdout.readline()) for proc in self.procs if proc.stdout is not None]

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(10)


@pytest.mark.servers
def test_two_processes_racing_get_exactly_the_limit(memory_table: SharedTable) -> None:
    """Two workers take tokens from one bucket at once, 15,000 tries each, for 20,000 tokens:
    without the row's lock some of their read-modify-writes would overlap and admit more."""
    workers = Workers(memory_table, 2, tries=15000, rpm=20000, concurrent=0)
    try:
        assert sum(workers.go()) == 20000
    finally:
        workers.close()


@pytest.mark.servers
def test_two_processes_racing_hold_exactly_max_concurrent(memory_table: SharedTable) -> None:
    table = memory_table
    workers = Workers(table, 2, tries=1000, rpm=0, concurrent=40)
    try:
        got = workers.go()
        assert sum(got) == 40
        watcher = attach(table, 2)
        shared = key("shared", concurrent=40)
        assert watcher.in_flight(shared) == 40
        workers.procs[0].send_signal(signal.SIGKILL)  # dies holding its slots
        workers.procs[0].wait(10)
        table.forget_worker(0)
        assert watcher.in_flight(shared) == got[1]
    finally:
        workers.close()
