"""The rows of the host's limits table (``gateway.limits.shared``): its layout, and the
mapped file as each process sees it.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct

MAGIC = b"VGWLIMT1"
HEADER = struct.Struct("<8sIII")  # magic, rows, workers, row size
HEADER_SIZE = 64
ID_SIZE = 16
EMPTY = bytes(ID_SIZE)
BUCKET = struct.Struct("<dd")  # tokens (inf: full, never used), when counted
COUNT = struct.Struct("<i")
COUNTS_AT = ID_SIZE + BUCKET.size


def row_size_for(workers: int) -> int:
    return (COUNTS_AT + COUNT.size * workers + 7) // 8 * 8


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

    def offsets(self, ident: bytes) -> range:
        """Where ``ident``'s row may be, in probing order (its home row first)."""
        home = int.from_bytes(ident[:8], "little") % self.rows
        return range(home, home + self.rows)

    def at(self, row: int) -> int:
        return HEADER_SIZE + (row % self.rows) * self.row_size

    def lock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, self.row_size, offset)

    def unlock(self, offset: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, self.row_size, offset)

    def in_flight(self, offset: int) -> int:
        counts: tuple[int, ...] = self.counts.unpack_from(self.map, offset + COUNTS_AT)
        return sum(counts)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)
