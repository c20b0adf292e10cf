"""Limits shared by the worker processes of one host, with no network hop: a table in shared
memory, each key's row locked while it is read and written.

The lock is ``fcntl.lockf`` on the row's bytes: two system calls per admit (load/limits.py
measures them), per row, so keys do not wait for each other; the kernel drops a dead
process's locks, so a worker killed mid-admit blocks nobody. POSIX record locks belong to a
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

A row: the key's id (the first 16 bytes of its name's SHA-256), its tokens and when they were
counted (CLOCK_MONOTONIC, one clock for the whole host), then one in-flight count per worker.
Each worker writes only its own count, so the slots of a worker that died are its column,
which ``forget_worker`` zeroes. Rows are found by open addressing from the id and never move;
a key beyond a full table is counted by each process alone, with a warning.
"""

from __future__ import annotations

import hashlib
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
    Table,
    row_size_for,
)
from gateway.limits.store import LimitsStore, over_concurrency, over_rate, refilled

log = logging.getLogger("vllm_gateway.limits")

LIMITS_TABLE_ENV = "VLLM_GATEWAY_LIMITS_TABLE"
ROWS = 65536  # limited keys a table holds (a keys file may hold tens of thousands)


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
            if table.map[offset : offset + ID_SIZE] == EMPTY:
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
        self._rows: dict[str, int] = {}  # key name -> its row's offset; -1: beyond the table
        self._beyond = LocalLimits()

    def admit(self, key: ApiKey) -> bool:
        offset = self._rows.get(key.name) or self._find(key)
        if offset < 0:
            return self._beyond.admit(key)
        table = self._table
        table.lock(offset)
        try:
            limit = key.max_concurrent
            if limit is not None and table.in_flight(offset) >= limit:
                raise over_concurrency(key)
            if (rpm := key.requests_per_minute) is not None:
                tokens, counted = BUCKET.unpack_from(table.map, offset + ID_SIZE)
                now = self._clock()
                tokens = refilled(tokens, now - counted, rpm)
                if tokens < 1.0:
                    BUCKET.pack_into(table.map, offset + ID_SIZE, tokens, now)
                    raise over_rate(key, tokens)
                BUCKET.pack_into(table.map, offset + ID_SIZE, tokens - 1.0, now)
            if limit is None:
                return False
            mine = offset + self._mine
            COUNT.pack_into(table.map, mine, COUNT.unpack_from(table.map, mine)[0] + 1)
            return True
        finally:
            table.unlock(offset)

    def release(self, key: ApiKey) -> None:
        offset = self._rows.get(key.name)
        if offset is None:
            return
        if offset < 0:
            self._beyond.release(key)
            return
        table, mine = self._table, offset + self._mine
        table.lock(offset)
        try:
            held = COUNT.unpack_from(table.map, mine)[0]
            if held > 0:
                COUNT.pack_into(table.map, mine, held - 1)
        finally:
            table.unlock(offset)

    def in_flight(self, key: ApiKey) -> int:
        """The key's requests in flight across every worker."""
        offset = self._rows.get(key.name) or self._find(key)
        if offset < 0:
            return self._beyond.in_flight(key)
        return self._table.in_flight(offset)

    async def close(self) -> None:
        self._table.close()

    def _find(self, key: ApiKey) -> int:
        """The key's row: the one with its id, or the first empty one, claimed."""
        table = self._table
        ident = hashlib.sha256(key.name.encode()).digest()[:ID_SIZE]
        for row in table.offsets(ident):
            offset = table.at(row)
            table.lock(offset)
            try:
                found = table.map[offset : offset + ID_SIZE]
                if found == EMPTY:
                    table.map[offset : offset + ID_SIZE] = ident
                    BUCKET.pack_into(table.map, offset + ID_SIZE, math.inf, self._clock())
                if found in (EMPTY, ident):
                    self._rows[key.name] = offset
                    return offset
            finally:
                table.unlock(offset)
        log.warning(
            "limits table %s is full (%d keys): key %r is counted by each worker alone",
            table.where,
            table.rows,
            key.name,
        )
        self._rows[key.name] = -1
        return -1


def shared_limits_from(value: str) -> SharedLimits:
    """A store from VLLM_GATEWAY_LIMITS_TABLE's value: ``<worker index>:fd:<descriptor>``
    or ``<worker index>:<path>``."""
    worker, _, where = value.partition(":")
    if not worker.isdigit() or not where:
        raise ValueError(f"{LIMITS_TABLE_ENV}={value!r}: expected <worker index>:<where>")
    return attach_shared_table(where, int(worker))
