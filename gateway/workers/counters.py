"""Requests in flight per replica across the gateway's workers: one table in shared memory.

A row per worker, a column per replica slot (the control plane gives each replica a slot).
Each worker writes only its own row, its own count of each replica, and whoever weighs a
replica reads the column's sum: each cell has one writer, and an aligned 8-byte store is not
torn, so no lock is taken on the request path. The control plane creates the table before the
first worker starts (an anonymous memory file, ``memfd``, whose descriptor the workers inherit:
nothing to name, nothing left behind after a crash), and zeroes the row of a worker that died:
its requests died with it.
"""

from __future__ import annotations

import mmap
import os

CELL = 8  # bytes: a signed 64-bit count


class InFlightTable:
    def __init__(self, fd: int, rows: int, slots: int) -> None:
        """``fd``: the table's memory file (``create`` makes one); ``rows``: the workers."""
        self.fd = fd
        self.rows = rows
        self.slots = slots
        self._map = mmap.mmap(fd, rows * slots * CELL)
        self._cells = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, rows: int, slots: int) -> InFlightTable:
        fd = os.memfd_create("vllm-gateway-in-flight")  # close-on-exec: only workers get it
        os.ftruncate(fd, rows * slots * CELL)  # zeroes
        return cls(fd, rows, slots)

    def set(self, row: int, slot: int, count: int) -> None:
        """A worker's own count of one replica (only that worker writes this cell)."""
        self._cells[row * self.slots + slot] = count

    def get(self, row: int, slot: int) -> int:
        return self._cells[row * self.slots + slot]

    def total(self, slot: int) -> int:
        """Requests in flight on the replica of ``slot``, all workers together."""
        return sum(self._cells[slot :: self.slots])

    def clear_row(self, row: int) -> list[int]:
        """A worker is gone: its counts go to zero; the slots it held requests on."""
        held = []
        base = row * self.slots
        for slot in range(self.slots):
            if self._cells[base + slot]:
                self._cells[base + slot] = 0
                held.append(slot)
        return held

    def close(self) -> None:
        self._cells.release()
        self._map.close()
        os.close(self.fd)


class SlotBook:
    """The control plane's slots: one per replica, kept while the replica exists, and given
    to another only once no worker counts anything on it."""

    def __init__(self, table: InFlightTable) -> None:
        self.table = table
        self._slots: dict[int, int] = {}  # id(replica) -> slot
        self._held: dict[int, object] = {}  # id(replica) -> the replica (keeps the id unique)
        self._free = list(range(table.slots - 1, -1, -1))
        self._leaving: list[int] = []  # slots of replicas gone, not yet free

    def slot(self, replica: object) -> int | None:
        """The replica's slot, a new one the first time; None when the table is full."""
        key = id(replica)
        slot = self._slots.get(key)
        if slot is None:
            self._reclaim()
            if not self._free:
                return None
            slot = self._slots[key] = self._free.pop()
            self._held[key] = replica
        return slot

    def keep_only(self, replicas: list[object]) -> None:
        """Replicas no longer anywhere: their slots are freed once their counts are zero."""
        alive = {id(r) for r in replicas}
        for key in [k for k in self._slots if k not in alive]:
            self._leaving.append(self._slots.pop(key))
            del self._held[key]
        self._reclaim()

    def _reclaim(self) -> None:
        still: list[int] = []
        for slot in self._leaving:
            (still if self.table.total(slot) else self._free).append(slot)
        self._leaving = still
