"""The table the workers of one host share: one bucket and one in-flight count per key, across
real processes, a dead worker's slots given back, and a stale key's row given to another."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.errors import RateLimited
from gateway.keys import ApiKey
from gateway.limits.build import limits_store
from gateway.limits.rows import EMPTY, STALE_AFTER, TOMBSTONE, Table, home_of, ident_of
from gateway.limits.shared import (
    LIMITS_TABLE_ENV,
    SharedLimits,
    SharedTable,
    attach_shared_table,
    create_shared_table,
)
from tests.gateway.limits.table_worker import CHURN_ROUND_SECONDS, churn_key
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


class Clock:
    """The host's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def attach_at(table: SharedTable, worker: int, clock: Clock) -> SharedLimits:
    return attach_shared_table(table.where, worker, clock=clock)


def small_table(tmp_path: Path, rows: int) -> Iterator[SharedTable]:
    table = create_shared_table(workers=3, directory=tmp_path, rows=rows)
    yield table
    table.close()


@pytest.fixture
def one_row(tmp_path: Path) -> Iterator[SharedTable]:
    yield from small_table(tmp_path, rows=1)


@pytest.fixture
def two_rows(tmp_path: Path) -> Iterator[SharedTable]:
    yield from small_table(tmp_path, rows=2)


def names_at_home(home: int, rows: int, count: int) -> list[str]:
    """Key names whose walk in a table of ``rows`` rows starts at row ``home``."""
    names = (f"key-{i}" for i in itertools.count())
    return list(itertools.islice((n for n in names if home_of(ident_of(n), rows) == home), count))


def test_a_removed_keys_row_goes_to_a_new_key_once_stale(
    one_row: SharedTable, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    first, second = attach_at(one_row, 0, clock), attach_at(one_row, 1, clock)
    first.admit(key("removed-from-the-keys-file", rpm=60))
    clock.now = STALE_AFTER + 1  # its bucket is full again: nothing to keep
    assert second.admit(key("new", concurrent=1))
    assert first.in_flight(key("new", concurrent=1)) == 1  # in the table, not alone
    assert "is full" not in caplog.text


def test_a_row_with_a_slot_held_or_a_recent_count_is_kept(two_rows: SharedTable) -> None:
    clock = Clock()
    first, second, third = (attach_at(two_rows, i, clock) for i in range(3))
    held, rated = key("held", concurrent=1), key("rated", rpm=1)
    first.admit(held)
    first.admit(rated)
    clock.now = 50.0
    with pytest.raises(RateLimited):
        first.admit(rated)  # counted at 50 s
    clock.now = 100.0  # held's slot is held; rated was counted 50 s ago
    second.admit(key("newcomer", concurrent=1))
    assert third.in_flight(key("newcomer", concurrent=1)) == 0  # no row: counted alone
    assert third.in_flight(held) == 1
    second.admit(rated)  # the token of the minute since 50 s, from the one bucket
    with pytest.raises(RateLimited):
        first.admit(rated)
    first.release(held)  # stale at once: admitted at 0 s; rated was counted at 100 s
    assert third.admit(key("late", concurrent=1))
    assert first.in_flight(key("late", concurrent=1)) == 1  # held's row, not rated's
    with pytest.raises(RateLimited):
        second.admit(rated)


def row_changes_hands(
    clock: Clock, mine: SharedLimits, theirs: SharedLimits, own: ApiKey, other: ApiKey
) -> None:
    """``mine`` used ``own`` once, a minute ago; ``own``'s row, stale, goes to ``other``,
    which both workers then hold a slot of (``mine`` still caches the row as ``own``'s)."""
    mine.admit(own)
    mine.release(own)
    clock.now = STALE_AFTER + 1
    theirs.admit(other)
    mine.admit(other)


def test_a_worker_whose_row_went_to_another_key_finds_its_own_again(
    two_rows: SharedTable,
) -> None:
    clock = Clock()
    mine, theirs = attach_at(two_rows, 0, clock), attach_at(two_rows, 1, clock)
    filler, own = key("filler", concurrent=1), key("own", concurrent=1)
    other = key("other", concurrent=2)
    theirs.admit(filler)
    row_changes_hands(clock, mine, theirs, own, other)  # the table is full: own's is freed
    theirs.release(filler)
    clock.now = 2 * (STALE_AFTER + 1)
    assert mine.admit(own)  # its cached row is other's: found again, in filler's freed row
    assert theirs.in_flight(own) == 1
    assert theirs.in_flight(other) == 2


def test_a_release_on_a_row_that_went_to_another_key_leaves_that_key_be(
    one_row: SharedTable,
) -> None:
    clock = Clock()
    mine, theirs = attach_at(one_row, 0, clock), attach_at(one_row, 1, clock)
    own, other = key("own", concurrent=1), key("other", concurrent=2)
    row_changes_hands(clock, mine, theirs, own, other)
    mine.release(own)  # one release too many, on a cached row that is other's now
    assert theirs.in_flight(other) == 2


def test_a_key_admitted_within_the_minute_keeps_its_row_without_a_rate(
    one_row: SharedTable,
) -> None:
    clock = Clock()
    first, second = attach_at(one_row, 0, clock), attach_at(one_row, 1, clock)
    busy = key("busy", concurrent=1)
    first.admit(busy)
    first.release(busy)
    clock.now = 50.0
    first.admit(busy)
    first.release(busy)
    clock.now = STALE_AFTER + 1  # claimed 62 s ago, admitted 12 s ago
    second.admit(key("newcomer", concurrent=1))
    assert first.in_flight(key("newcomer", concurrent=1)) == 0  # no row for it
    assert second.admit(busy)
    assert first.in_flight(busy) == 1  # still its row, shared
    second.release(busy)
    clock.now = 2 * (STALE_AFTER + 1)  # untouched for a minute since
    assert second.admit(key("later", concurrent=1))
    assert first.in_flight(key("later", concurrent=1)) == 1


def test_a_full_table_heals_once_its_rows_are_stale(
    one_row: SharedTable, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    first, second = attach_at(one_row, 0, clock), attach_at(one_row, 1, clock)
    first.admit(key("old", concurrent=1))
    first.release(key("old", concurrent=1))
    new = key("new", concurrent=1)
    assert second.admit(new)
    assert "is full" in caplog.text and first.in_flight(new) == 0  # counted alone
    second.release(new)
    clock.now = STALE_AFTER + 1
    assert second.admit(new)  # tried again: old's row was stale
    assert first.in_flight(new) == 1


def test_a_freed_row_keeps_the_keys_past_it_found(tmp_path: Path) -> None:
    """Two keys start their walk at the same row; the first one's row is freed. A worker that
    has not seen the second finds it past the freed row, and does not claim a second row
    for it there."""
    table = create_shared_table(workers=2, directory=tmp_path, rows=3)
    try:
        clock = Clock()
        first_worker, second_worker = attach_at(table, 0, clock), attach_at(table, 1, clock)
        gone, second, late = (key(n, concurrent=5) for n in names_at_home(0, 3, 3))
        (elsewhere,) = (key(n, concurrent=5) for n in names_at_home(2, 3, 1))
        first_worker.admit(gone)  # row 0
        first_worker.release(gone)
        first_worker.admit(second)  # row 1, past gone's
        clock.now = STALE_AFTER + 1
        first_worker.admit(elsewhere)  # row 2; its claim's sweep frees row 0
        second_worker.admit(second)
        assert first_worker.in_flight(second) == 2  # one row for it, past the freed one
        second_worker.admit(late)  # the table's one free row: gone's
        assert first_worker.in_flight(late) == 1
    finally:
        table.close()


class Workers:
    """Real worker processes on one table, started together."""

    def __init__(self, table: SharedTable, count: int, *args: object):
        """``args``: table_worker.py's arguments."""
        self.procs = [  # started as the control plane starts its workers
            subprocess.Popen(
                [sys.executable, WORKER, *map(str, args)],
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

    def go(self) -> list[str]:
        """What each printed once it was done."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [proc.stdout.readline().strip() for proc in self.procs if proc.stdout is not None]

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()
            proc.wait(10)


@pytest.mark.servers
def test_two_processes_racing_get_exactly_the_limit(memory_table: SharedTable) -> None:
    """Two workers take tokens from one bucket at once, 15,000 tries each, for 20,000 tokens:
    without the row's lock some of their read-modify-writes would overlap and admit more."""
    workers = Workers(memory_table, 2, 15000, 20000, 0)  # tries, rpm, max_concurrent (0: none)
    try:
        assert sum(map(int, workers.go())) == 20000
    finally:
        workers.close()


@pytest.mark.servers
def test_two_processes_racing_hold_exactly_max_concurrent(memory_table: SharedTable) -> None:
    table = memory_table
    workers = Workers(table, 2, 1000, 0, 40)
    try:
        got = list(map(int, workers.go()))
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


@pytest.mark.servers
def test_workers_freeing_and_claiming_rows_at_once_never_give_a_key_two(tmp_path: Path) -> None:
    """Four workers run rounds of keys through a table too small to hold them all, their
    rounds out of step, so that stale rows are freed and claimed under each other all the
    while; every key of the last round, its slots held by every worker, has one row, which
    counts them all."""
    keys, rounds, count = 40, 25, 4
    table = create_shared_table(workers=count, directory=tmp_path, rows=4 * keys)
    workers = Workers(table, count, "churn", keys, rounds)
    try:
        assert workers.go() == ["done"] * count
        clock = Clock()
        clock.now = (rounds - 1) * CHURN_ROUND_SECONDS
        watcher = attach_at(table, 0, clock)
        last = [churn_key(rounds - 1, i, keys) for i in range(keys)]
        assert [watcher.in_flight(key) for key in last] == [count] * keys
        assert table.path is not None
        rows = Table(str(table.path), os.open(table.path, os.O_RDWR))
        idents = [rows.ident_at(rows.at(row)) for row in range(rows.rows)]
        rows.close()
        keyed = [ident for ident in idents if ident not in (EMPTY, TOMBSTONE)]
        assert len(keyed) == len(set(keyed))  # no key in two rows
    finally:
        workers.close()
        table.close()
