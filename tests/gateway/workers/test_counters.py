"""The in-flight table: each worker writes its own row, readers sum a replica's column."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gateway.workers.counters import InFlightTable, SlotBook


def test_a_replicas_count_is_the_sum_of_every_workers_own() -> None:
    table = InFlightTable.create(rows=3, slots=8)
    table.set(0, 5, 2)
    table.set(2, 5, 3)
    table.set(1, 4, 7)
    assert table.total(5) == 5
    assert table.total(4) == 7
    assert table.total(0) == 0


@pytest.mark.servers  # starts a process
def test_another_process_writes_the_same_memory() -> None:
    """A worker gets the table's descriptor at its start and writes its row there."""
    table = InFlightTable.create(rows=2, slots=4)
    child = (
        "import sys; from gateway.workers.counters import InFlightTable; "
        "InFlightTable(int(sys.argv[1]), 2, 4).set(1, 3, 9)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    subprocess.run(
        [sys.executable, "-c", child, str(table.fd)], pass_fds=[table.fd], check=True, env=env
    )
    assert table.total(3) == 9


def test_a_dead_workers_row_goes_to_zero_and_says_which_replicas_it_held() -> None:
    table = InFlightTable.create(rows=2, slots=4)
    table.set(0, 1, 4)
    table.set(1, 1, 1)
    table.set(1, 3, 2)
    assert table.clear_row(1) == [1, 3]
    assert (table.total(1), table.total(3)) == (4, 0)


def test_a_slot_is_kept_while_its_replica_exists_and_reused_only_once_nothing_counts_on_it() -> (
    None
):
    table = InFlightTable.create(rows=1, slots=2)
    book = SlotBook(table)
    a, b, c = object(), object(), object()
    slot_a, slot_b = book.slot(a), book.slot(b)
    assert book.slot(a) == slot_a and slot_a != slot_b
    assert book.slot(c) is None  # full
    assert slot_a is not None
    table.set(0, slot_a, 1)  # a request still holds a, which is gone from every pool
    book.keep_only([b])
    assert book.slot(c) is None
    table.set(0, slot_a, 0)
    book.keep_only([b])
    assert book.slot(c) == slot_a
