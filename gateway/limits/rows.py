"""The rows of the host's limits table (``gateway.limits.shared``): where a key's row is, how
a free one is claimed, and how a stale one is freed for another key.

A row: the key's id (the first 16 bytes of its name's SHA-256), its tokens and when they were
counted or the key was last admitted (CLOCK_MONOTONIC, one clock for the whole host), then one
in-flight count per worker. A key's row is found by open addressing: the walk starts at its
home row (its id modulo the rows) and ends at the key's id or at the first empty row.

A row is stale once no worker holds a slot in it and it was untouched for ``STALE_AFTER``:
its bucket is full again for any rate (``requests_per_minute`` refills a whole bucket within
a minute), so freeing it loses nothing. A freed row becomes a tombstone, not an empty row, so
a key claimed past it is still found; a claim takes the first tombstone on its walk only once
the walk has shown that the key is not further along. A sweep also empties the tombstones
that no key's walk crosses (a key's walk crosses the rows from its home to its own), so walks
stay short.

Two locks, both ``fcntl.lockf``: a row's (its bytes), for every read and write of its bucket
and counts; and the table's (the header's bytes), taken by whatever writes an id: claims
(once per key per worker) and sweeps. Ids change only under the table's lock, so a claim that
holds it walks them without row locks, and two workers never claim two rows for one key. The
table's lock is taken first, a row's second; the hot path takes only its row's, where it
checks the id (a worker's cached row may have been freed, or claimed by another key, since
it found it).
"""

from __future__ import annotations

import fcntl
import hashlib
import math
import mmap
import os
import struct

MAGIC = b"VGWLIMT1"
HEADER = struct.Struct("<8sIII")  # magic, rows, workers, row size
CURSOR = struct.Struct("<I")  # in the header: where the next sweep starts
CURSOR_AT = 24
HEADER_SIZE = 64
ID_SIZE = 16
EMPTY = bytes(ID_SIZE)
TOMBSTONE = b"\xff" * ID_SIZE  # a freed row: walks go on past it
BUCKET = struct.Struct("<dd")  # tokens (inf: full, never used), when counted or last admitted
COUNT = struct.Struct("<i")
COUNTS_AT = ID_SIZE + BUCKET.size
WHEN_AT = ID_SIZE + 8
STALE_AFTER = 61.0  # seconds untouched after which a bucket is full for any rate (60), and a margin


def row_size_for(workers: int) -> int:
    return (COUNTS_AT + COUNT.size * workers + 7) // 8 * 8


def ident_of(name: str) -> bytes:
    """A key's id in the table: the first bytes of its name's SHA-256."""
    return hashlib.sha256(name.encode()).digest()[:ID_SIZE]


def home_of(ident: bytes, rows: int) -> int:
    """Where the walk for ``ident`` starts."""
    return int.from_bytes(ident[:8], "little") % rows


class Table:
    """The mapped file, as each process sees it."""

    def __init__(self, where: str, fd: int) -> None:
        """``where``: ``fd:<n>`` for an inherited memory file, else the file's path."""
        magic, rows, workers, row_size = HEADER.unpack(os.pread(fd, HEADER.size, 0))
        if magic != MAGIC:
            os.close(fd)
            raise ValueError(f"{where} is not a limits table")
        self.where, self.fd = where, fd
        self.rows: int = rows
        self.workers: int = workers
        self.row_size: int = row_size
        self.map = mmap.mmap(fd, HEADER_SIZE + rows * row_size)
        self.counts = struct.Struct(f"<{workers}i")
        self._when = struct.Struct("<d")

    def at(self, row: int) -> int:
        return HEADER_SIZE + (row % self.rows) * self.row_size

    def ident_at(self, offset: int) -> bytes:
        return self.map[offset : offset + ID_SIZE]

    def lock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.row_size, offset)

    def unlock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, self.row_size, offset)

    def lock_ids(self) -> None:
        """The table's lock: no other process writes an id until ``unlock_ids``."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, HEADER_SIZE, 0)

    def unlock_ids(self) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, HEADER_SIZE, 0)

    def in_flight(self, offset: int) -> int:
        counts: tuple[int, ...] = self.counts.unpack_from(self.map, offset + COUNTS_AT)
        return sum(counts)

    def walk(self, ident: bytes) -> tuple[int | None, int | None]:
        """``ident``'s row, if its walk finds it, and the first free row on that walk (a
        tombstone, else the empty row that ended it). Exact under ``lock_ids``; without it, a
        glance (a row it finds is confirmed under the row's lock before use)."""
        free = None
        home = home_of(ident, self.rows)
        for row in range(home, home + self.rows):
            offset = self.at(row)
            found = self.map[offset : offset + ID_SIZE]
            if found == ident:
                return offset, free
            if found == EMPTY:
                return None, offset if free is None else free
            if found == TOMBSTONE and free is None:
                free = offset
        return None, free

    def claim(self, ident: bytes, now: float) -> int | None:
        """Under ``lock_ids``: ``ident``'s row, claimed if it had none; None: no row is free
        on its walk (the table is full)."""
        found, free = self.walk(ident)
        if found is not None or free is None:
            return found
        self.lock(free)
        try:
            self.map[free : free + ID_SIZE] = ident
            BUCKET.pack_into(self.map, free + ID_SIZE, math.inf, now)
            self.counts.pack_into(self.map, free + COUNTS_AT, *([0] * self.workers))
        finally:
            self.unlock(free)
        return free

    def sweep_on(self, count: int, now: float) -> int:
        """Under ``lock_ids``: sweeps ``count`` rows on from where the last sweep stopped."""
        start = CURSOR.unpack_from(self.map, CURSOR_AT)[0]
        count = min(count, self.rows)
        CURSOR.pack_into(self.map, CURSOR_AT, (start + count) % self.rows)
        return self.sweep(start, count, now)

    def sweep(self, start: int, count: int, now: float) -> int:
        """Under ``lock_ids``: frees the stale rows among ``count`` from ``start``, then
        empties the tombstones there that no walk crosses; how many rows it freed."""
        freed = 0
        for row in range(start, start + count):
            offset = self.at(row)
            if self.ident_at(offset) not in (EMPTY, TOMBSTONE) and self._stale(offset, now):
                freed += self._free(offset, now)  # a glance first: most rows are not stale
        self._empty_uncrossed(start, count)
        return freed

    def _stale(self, offset: int, now: float) -> bool:
        when: float = self._when.unpack_from(self.map, offset + WHEN_AT)[0]
        return now - when > STALE_AFTER and self.in_flight(offset) == 0

    def _free(self, offset: int, now: float) -> int:
        self.lock(offset)
        try:
            if not self._stale(offset, now):
                return 0
            self.map[offset : offset + ID_SIZE] = TOMBSTONE
            return 1
        finally:
            self.unlock(offset)

    def _empty_uncrossed(self, start: int, count: int) -> None:
        """Empties the tombstones among ``count`` rows from ``start`` that no key's walk
        crosses. It reads on from ``start`` until each is known crossed, or known not to be:
        a walk ends at an empty row, so no key past one crosses a tombstone before it."""
        end, rows = start + count, self.rows
        pending: list[int] = []  # tombstones in the rows, none of the keys read so far crosses
        for row in range(start, end + rows - 1):  # no empty row: each key read once, at most
            if row >= end and not pending:
                return
            offset = self.at(row)
            found = self.ident_at(offset)
            if found == TOMBSTONE:
                if row < end:
                    pending.append(row)
            elif found == EMPTY:
                self._empty(pending)
                pending = []
                if row >= end:
                    return
            else:  # a key's walk crosses the rows from its home to its own
                home = row - (row - home_of(found, rows)) % rows
                while pending and pending[-1] >= home:
                    pending.pop()
        self._empty(pending)

    def _empty(self, rows: list[int]) -> None:
        """Tombstones to empty rows; no row lock, as a verifying worker reads either as not
        its id, and only the holder of ``lock_ids`` writes ids."""
        for row in rows:
            offset = self.at(row)
            self.map[offset : offset + ID_SIZE] = EMPTY

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
