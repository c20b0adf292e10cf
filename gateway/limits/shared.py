"""Limits shared by the worker processes of one host, with no network hop: a table in shared
memory, each key's row locked while it is read and written.

The lock is ``fcntl.lockf`` on the row's bytes: two system calls per admit (load/limits.py
measures them), per row, so keys do not wait for each other (a key the table has no row for
yet takes the table's lock too, once, to claim one); the kernel drops a dead process's
locks, so a worker killed mid-admit blocks nobody. POSIX record locks belong to a
process, not a thread: one store per worker process, used from its event loop.

The control plane (``workers: N``) and its workers meet here (``gateway.workers.limits``):

    table = create_shared_table(workers=N)   # before the first worker starts
    spawn(..., pass_fds=table.pass_fds)      # worker i, told table.where on its command line
    attach_shared_table(where, i)            # in worker i
    table.forget_worker(i)                   # before worker i is started again after it died
    table.close()                            # at exit

The table is an anonymous memory file (``memfd``) whose descriptor the workers inherit
(``pass_fds``): nothing to name, nothing left behind by a crash; with ``directory`` it is a
file there instead, which any process may attach by path. A process that is no worker (two
standalone gateways, as load/limits.py runs them) attaches by its environment:
``gateway.limits.build.limits_store`` reads VLLM_GATEWAY_LIMITS_TABLE (``<worker
index>:fd:<descriptor>`` or ``<worker index>:<path>``, ``SharedTable.env``).

A row: a key's id, its bucket, then one in-flight count per worker (``gateway.limits.rows``).
Each worker writes only its own count, so the slots of a worker that died are its column,
which ``forget_worker`` zeroes. A row is freed once it is stale (no slot held, its bucket full
again for any rate), which loses nothing, and goes to the next key that needs one. The claims
pay for that: each sweeps a few rows on from where the last sweep stopped, and one that finds
the table full sweeps all of it and tries again. Rows are needed only when keys are claimed,
so nothing sweeps on a timer (a whole sweep would stall the control plane's loop). A key
beyond a table still full is counted by each worker alone, with a warning, and tries again
later.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.keys import ApiKey
from gateway.limits.local import LocalLimits
from gateway.limits.rows import (
    BUCKET,
    COUNT,
    COUNTS_AT,
    EMPTY,
    HEADER,
    HEADER_SIZE,
    ID_SIZE,
    MAGIC,
    TOMBSTONE,
    Table,
    ident_of,
    row_size_for,
)
from gateway.limits.store import LimitsStore, over_concurrency, over_rate, refilled

log = logging.getLogger("vllm_gateway.limits")

LIMITS_TABLE_ENV = "VLLM_GATEWAY_LIMITS_TABLE"
ROWS = 65536  # limited keys a table holds (a keys file may hold tens of thousands)
SWEEP_ROWS = 64  # rows each claim sweeps, on from where the last sweep stopped
RETRY_FULL = 10.0  # seconds a worker that found the table full waits to sweep all of it again


class SharedTable:
    """The control plane's handle on the table its workers share."""

    def __init__(self, table: Table, path: Path | None) -> None:
        self._table = table
        self.path = path  # None: a memory file, attached by its inherited descriptor
        self.workers = table.workers
        self.pass_fds: tuple[int, ...] = () if path is not None else (table.fd,)

    @property
    def where(self) -> str:
        """What ``attach_shared_table`` takes: the path, or ``fd:<n>``."""
        return self._table.where

    def env(self, worker: int) -> dict[str, str]:
        """What worker ``worker`` (0 .. workers - 1) needs in its environment to attach (and
        ``pass_fds`` among the descriptors it inherits)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker}: the table has {self.workers} columns")
        return {LIMITS_TABLE_ENV: f"{worker}:{self._table.where}"}

    def forget_worker(self, worker: int) -> None:
        """Worker ``worker`` is gone: the slots it held are free (call before starting its
        successor, which writes the same column)."""
        table, column = self._table, COUNTS_AT + COUNT.size * worker
        for row in range(table.rows):
            offset = table.at(row)
            if table.map[offset : offset + ID_SIZE] in (EMPTY, TOMBSTONE):
                continue
            table.lock(offset)
            try:
                COUNT.pack_into(table.map, offset + column, 0)
            finally:
                table.unlock(offset)

    def close(self) -> None:
        self._table.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def create_shared_table(
    workers: int, directory: str | Path | None = None, rows: int = ROWS
) -> SharedTable:
    """A new table for ``workers`` worker processes: a memory file, or a file in
    ``directory``."""
    if workers < 1 or rows < 1:
        raise ValueError("a table needs at least one worker and one row")
    if directory is None:
        fd, path = os.memfd_create("vllm-gateway-limits"), None  # close-on-exec: see pass_fds
        where = f"fd:{fd}"
    else:
        fd, name = tempfile.mkstemp(prefix="vllm-gateway-limits-", dir=directory)
        path = Path(name)
        where = name
    row_size = row_size_for(workers)
    os.ftruncate(fd, HEADER_SIZE + rows * row_size)  # zeros: every row empty
    os.pwrite(fd, HEADER.pack(MAGIC, rows, workers, row_size), 0)
    return SharedTable(Table(where, fd), path)


def attach_shared_table(
    where: str | Path, worker: int, clock: Callable[[], float] = time.monotonic
) -> SharedLimits:
    """Worker ``worker``'s store on the table at ``where`` (a path, or ``fd:<n>`` for an
    inherited memory file); ``clock``: the host's monotonic clock (the same for every
    worker)."""
    where = str(where)
    if where.startswith("fd:") and where[3:].isdigit():
        fd = os.dup(int(where[3:]))  # its own: closing it leaves the inherited one be
    else:
        fd = os.open(where, os.O_RDWR)
    table = Table(where, fd)
    if not 0 <= worker < table.workers:
        table.close()
        raise ValueError(f"worker {worker}: the table at {where} has {table.workers} columns")
    return SharedLimits(table, worker, clock)


class SharedLimits(LimitsStore):
    """One worker's view: exact across the workers of its host."""

    def __init__(self, table: Table, worker: int, clock: Callable[[], float]) -> None:
        self._table = table
        self._clock = clock
        self._mine = COUNTS_AT + COUNT.size * worker  # this worker's count, in a row
        self._rows: dict[str, tuple[int, bytes]] = {}  # key name -> (its row's offset, its id)
        self._beyond = LocalLimits()  # keys the table had no row for (offset -1)
        self._full_until = -math.inf  # found full: no whole sweep, no retry before this

    def admit(self, key: ApiKey) -> bool:
        while True:
            offset, ident = self._row(key)
            if offset < 0:
                return self._beyond.admit(key)
            admitted = self._admit_at(offset, ident, key)
            if admitted is not None:
                return admitted
            del self._rows[key.name]  # its row was freed since: find it again

    def _admit_at(self, offset: int, ident: bytes, key: ApiKey) -> bool | None:
        """None: the row is no longer the key's."""
        table = self._table
        table.lock(offset)
        try:
            if table.map[offset : offset + ID_SIZE] != ident:
                return None
            limit = key.max_concurrent
            if limit is not None and table.in_flight(offset) >= limit:
                raise over_concurrency(key)
            now = self._clock()
            if (rpm := key.requests_per_minute) is not None:
                tokens, counted = BUCKET.unpack_from(table.map, offset + ID_SIZE)
                tokens = refilled(tokens, now - counted, rpm)
                if tokens < 1.0:
                    BUCKET.pack_into(table.map, offset + ID_SIZE, tokens, now)
                    raise over_rate(key, tokens)
                BUCKET.pack_into(table.map, offset + ID_SIZE, tokens - 1.0, now)
            else:
                BUCKET.pack_into(table.map, offset + ID_SIZE, math.inf, now)  # touched
            if limit is None:
                return False
            mine = offset + self._mine
            COUNT.pack_into(table.map, mine, COUNT.unpack_from(table.map, mine)[0] + 1)
            return True
        finally:
            table.unlock(offset)

    def release(self, key: ApiKey) -> None:
        row = self._rows.get(key.name)
        if row is None:
            return
        offset, ident = row
        if offset < 0:
            self._beyond.release(key)
            return
        table, mine = self._table, offset + self._mine
        table.lock(offset)
        try:
            ours = table.map[offset : offset + ID_SIZE] == ident
            held = COUNT.unpack_from(table.map, mine)[0] if ours else 0
            if held > 0:
                COUNT.pack_into(table.map, mine, held - 1)
        finally:
            table.unlock(offset)
        if not ours:  # freed: this worker held no slot in it (a slot keeps a row)
            del self._rows[key.name]

    def in_flight(self, key: ApiKey) -> int:
        """The key's requests in flight across every worker."""
        table = self._table
        while True:
            offset, ident = self._row(key)
            if offset < 0:
                return self._beyond.in_flight(key)
            table.lock(offset)
            try:
                ours = table.map[offset : offset + ID_SIZE] == ident
                count = table.in_flight(offset)
            finally:
                table.unlock(offset)
            if ours:
                return count
            del self._rows[key.name]

    async def close(self) -> None:
        self._table.close()

    def _row(self, key: ApiKey) -> tuple[int, bytes]:
        """The key's row, as this worker last found it; a key beyond the table tries again
        once the table may have room and this worker holds none of its slots."""
        row = self._rows.get(key.name)
        if row is not None and (row[0] >= 0 or not self._may_retry(key)):
            return row
        ident = ident_of(key.name)
        found, _ = self._table.walk(ident)  # a glance: most keys are found without the lock
        offset = found if found is not None else self._claim(ident, key)
        self._rows[key.name] = row = (offset, ident)
        return row

    def _may_retry(self, key: ApiKey) -> bool:
        return self._clock() >= self._full_until and self._beyond.in_flight(key) == 0

    def _claim(self, ident: bytes, key: ApiKey) -> int:
        """Under the table's lock: the key's row, claimed if no worker did; -1: full."""
        table, now = self._table, self._clock()
        table.lock_ids()
        try:
            table.sweep_on(SWEEP_ROWS, now)
            offset = table.claim(ident, now)
            if offset is None and now >= self._full_until:
                table.sweep(0, table.rows, now)
                offset = table.claim(ident, now)
                if offset is None:
                    self._full_until = now + RETRY_FULL
        finally:
            table.unlock_ids()
        if offset is not None:
            return offset
        log.warning(
            "limits table %s is full (%d keys): key %r is counted by each worker alone",
            table.where,
            table.rows,
            key.name,
        )
        return -1


def shared_limits_from(value: str) -> SharedLimits:
    """A store from VLLM_GATEWAY_LIMITS_TABLE's value: ``<worker index>:fd:<descriptor>``
    or ``<worker index>:<path>``."""
    worker, _, where = value.partition(":")
    if not worker.isdigit() or not where:
        raise ValueError(f"{LIMITS_TABLE_ENV}={value!r}: expected <worker index>:<where>")
    return attach_shared_table(where, int(worker))
