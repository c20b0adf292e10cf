"""The rows of the limits table: a sweep frees stale rows as tombstones, and empties the
tombstones no key's walk crosses, wrapping around the table's end included."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.limits.rows import (
    BUCKET,
    EMPTY,
    ID_SIZE,
    STALE_AFTER,
    TOMBSTONE,
    Table,
    home_of,
    ident_of,
)
from gateway.limits.shared import create_shared_table

FRESH = STALE_AFTER + 10  # the time of the sweeps: rows claimed at 0 s are stale by then


@pytest.fixture
def eight(tmp_path: Path) -> Iterator[Table]:
    yield from table_of(tmp_path, 8)


@pytest.fixture
def four(tmp_path: Path) -> Iterator[Table]:
    yield from table_of(tmp_path, 4)


def table_of(tmp_path: Path, rows: int) -> Iterator[Table]:
    shared = create_shared_table(workers=1, directory=tmp_path, rows=rows)
    assert shared.path is not None
    table = Table(str(shared.path), os.open(shared.path, os.O_RDWR))
    yield table
    table.close()
    shared.close()


def idents_at_home(home: int, rows: int, count: int) -> list[bytes]:
    idents = (ident_of(f"key-{i}") for i in itertools.count())
    return list(itertools.islice((i for i in idents if home_of(i, rows) == home), count))


def claimed(table: Table, *idents: bytes) -> list[int]:
    """Each claimed at 0 s, in order: their rows (as offsets)."""
    offsets = []
    for ident in idents:
        offset = table.claim(ident, 0.0)
        assert offset is not None
        offsets.append(offset)
    return offsets


def touch(table: Table, offset: int) -> None:
    """As an admit at the sweeps' time would: not stale."""
    BUCKET.pack_into(table.map, offset + ID_SIZE, math.inf, FRESH)


def ids(table: Table) -> list[bytes]:
    return [table.ident_at(table.at(row)) for row in range(table.rows)]


def test_a_freed_row_that_a_walk_crosses_stays_a_tombstone(eight: Table) -> None:
    first, second = idents_at_home(2, 8, 2)
    (alone,) = idents_at_home(5, 8, 1)
    _, second_at, _ = claimed(eight, first, second, alone)
    touch(eight, second_at)
    assert eight.sweep(0, 8, FRESH) == 2
    # second's walk, from row 2, crosses first's freed row; nobody's crosses alone's
    assert ids(eight) == [EMPTY, EMPTY, TOMBSTONE, second, EMPTY, EMPTY, EMPTY, EMPTY]
    assert eight.walk(second) == (second_at, eight.at(2))
    assert eight.sweep(0, 8, 2 * FRESH) == 1
    assert ids(eight) == [EMPTY] * 8


def test_walks_that_wrap_around_the_end_keep_their_tombstones(four: Table) -> None:
    last, wrapped, kept = idents_at_home(3, 4, 3)  # rows 3, 0, 1
    claimed(four, last, wrapped, kept)
    touch(four, four.at(1))
    for row in (3, 0):  # sweeps of one row at a time see kept's walk beyond them
        assert four.sweep(row, 1, FRESH) == 1
    assert ids(four) == [TOMBSTONE, kept, EMPTY, TOMBSTONE]
    four.sweep(0, 4, FRESH)
    assert ids(four) == [TOMBSTONE, kept, EMPTY, TOMBSTONE]


def test_a_full_table_of_stale_rows_empties_entirely(four: Table) -> None:
    claimed(four, *idents_at_home(1, 4, 4))
    assert four.claim(ident_of("one too many"), 0.0) is None
    assert four.sweep(2, 4, FRESH) == 4  # from row 2, around the end
    assert ids(four) == [EMPTY] * 4
    assert four.claim(ident_of("one too many"), FRESH) is not None


def test_sweeps_go_on_from_where_the_last_one_stopped(eight: Table) -> None:
    claimed(eight, *(idents_at_home(row, 8, 1)[0] for row in range(8)))
    assert eight.sweep_on(3, FRESH) == 3
    assert ids(eight)[:4] == [EMPTY, EMPTY, EMPTY, idents_at_home(3, 8, 1)[0]]
    assert eight.sweep_on(6, FRESH) == 5  # rows 3 to 7, then 0 again
    assert ids(eight) == [EMPTY] * 8
