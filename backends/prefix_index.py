"""Which replica most likely holds a prompt's prefix in its KV cache (``balance: prefix``).

vLLM caches a prompt in fixed-size blocks of tokens, each named by a hash chained over the
blocks before it, so a block is reused only when everything before it matches too. The gateway
sees bytes, not tokens, so it does the same over a stable byte rendering of the prompt
(``gateway.prompt_prefix``): fixed-size blocks of bytes, each hash naming its block and all
before it, seeded by the adapter (a LoRA adapter's cache is its own), computed only as they
are read (``backends.prompt_blocks``). A trailing partial block is not hashed, as vLLM caches
full blocks only, so a short prompt costs nothing here.

Each replica's table is a bounded, least recently used first, memory of the block hashes
routed to it, a prompt's first blocks the most recent (vLLM frees a request's last blocks
first too), so a block is remembered only with all its leading blocks. Beside the tables, one
map from each block to the replicas holding it (a bit each) answers a prompt for the whole
pool at once: the longest run of leading blocks some replica holds is found in a few lookups
(its last blocks first, then a binary search), however many replicas there are. A table is
forgotten when its replica restarts, sleeps or is removed: it is tagged with the replica's
``ready_since`` when it learnt, and a replica that became ready again since then (restarted,
woke, came back from unhealthy) starts empty. ``forget`` does the same at once, for callers
that know. What this costs a request is measured in load/results/prefix-cost-2026-12-03.md.

The load bound, as SGLang's cache-aware router has it: the replica with the longest match
gets the request unless it carries more than ``slack`` requests beyond the least loaded one
*and* more than ``ratio`` times as many; then the fewest in flight decides. A prompt no
replica holds goes to the fewest in flight, ties to the replica that remembers least, which
spreads new conversations evenly.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Literal

from backends.prompt_blocks import PromptBlocks, seed_of

if TYPE_CHECKING:
    from backends.pool import Replica

# Bytes of rendered prompt per token, to turn a replica's KV cache size into blocks of text:
# about 4 for the English text of BPE vocabularies of 32-150k tokens.
TEXT_BYTES_PER_TOKEN = 4

Route = Literal["prefix", "load", "new"]  # held prefix; held but too loaded; held by none
ROUTES: tuple[Route, ...] = ("prefix", "load", "new")
# A full table lets go of this share of its capacity more than it must at once, so that the
# search for its oldest blocks runs once every so many new blocks, not at each.
EVICTION_SLACK = 16


@dataclass(frozen=True, slots=True)
class PrefixPolicy:
    """The knobs of ``balance: prefix`` (``gateway.model_settings.PrefixSettings``)."""

    block_bytes: int = 256
    max_blocks: int = 16384  # per replica
    slack: int = 2
    ratio: float = 1.5


def chain(data: bytes, block_bytes: int, seed: str = "") -> tuple[int, ...]:
    """The hashes of ``data``'s full blocks, each naming its block and all before it
    (``backends.prompt_blocks``), seeded by ``seed`` (an adapter's name)."""
    return PromptBlocks(data, block_bytes, seed_of(seed)).all()


@dataclass(eq=False, slots=True)
class _Table:
    """One replica's remembered blocks, each with the tick it was last written at (newest
    highest; the clock counts blocks written), the ready moment they belong to, and its bit
    in the router's map of holders."""

    epoch: float | None
    bit: int
    blocks: dict[int, int] = field(default_factory=dict)
    tick: int = 0

    def match(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` it holds (binary search: a block is only
        remembered with all its leading blocks, which are newer)."""
        blocks = self.blocks
        if not hashes or hashes[0] not in blocks:
            return 0
        low, high = 1, len(hashes)  # hashes[:low] held; hashes[high:] not known to be
        while low < high:
            middle = (low + high + 1) // 2
            if hashes[middle - 1] in blocks:
                low = middle
            else:
                high = middle - 1
        return low

    def oldest(self, count: int) -> list[int]:
        """The ``count`` least recently used blocks (a few more where ticks tie)."""
        if count <= 0:
            return []
        if count >= len(self.blocks):
            return list(self.blocks)
        cut = sorted(self.blocks.values())[count - 1]
        return [value for value, tick in self.blocks.items() if tick <= cut]


class PrefixRouter:
    """The prefix index of one pool's replicas, and the choice it makes between them."""

    def __init__(self, policy: PrefixPolicy | None = None) -> None:
        self.policy = policy or PrefixPolicy()
        self._tables: dict[Replica, _Table] = {}
        self._holders: dict[int, int] = {}  # block hash -> the bits of the tables holding it
        self._owners: dict[int, Replica] = {}  # a table's bit -> its replica
        self._bits = 0  # every table's bit
        self._seeds: dict[str | None, int] = {}  # adapter -> the seed of its hashes
        # Requests per (replica, route), for /metrics; replicas that left are pruned with them.
        self.routed: dict[tuple[Replica, Route], int] = {}

    def hashes(self, data: bytes, adapter: str | None) -> PromptBlocks:
        """The prompt's block hashes, seeded by the adapter (its seed hashed once), each
        computed when ``choose`` first reads it."""
        if (seed := self._seeds.get(adapter)) is None:
            seed = self._seeds[adapter] = seed_of(adapter)
        return PromptBlocks(data, self.policy.block_bytes, seed)

    def choose(
        self,
        candidates: Sequence[Replica],
        hashes: Sequence[int],
        members: Collection[Replica] | None = None,
    ) -> Replica | None:
        """The replica for a prompt among ``candidates`` (ready, allowed), learning that it
        will hold the prompt from now on. ``members``: the pool's replicas, if others may
        have left it (their tables are dropped: ``prune``)."""
        if not candidates:
            return None
        if members is not None and len(self._tables) > len(members):
            self.prune(members)
        route: Route = "new"
        count = len(hashes)
        best, held = self._best_holder(candidates, hashes, count) if count and self._bits else _NONE
        if best is None:
            chosen = self._least(candidates)
        elif best.in_flight > self.policy.slack and self._overloaded(best, candidates):
            chosen, route = self._least(candidates), "load"
        else:
            chosen, route = best, "prefix"
        table = self._tables.get(chosen)
        if table is None or table.epoch != chosen.ready_since:
            table = self._table(chosen)
        capacity = self.policy.max_blocks if chosen.kv_cache is None else self._capacity(chosen)
        held = held if route == "prefix" else table.match(hashes)
        self._learn(table, hashes, count, held, capacity)
        if (over := len(table.blocks) - capacity) > 0:
            self._evict(table, over + capacity // EVICTION_SLACK)
        key = (chosen, route)
        self.routed[key] = self.routed.get(key, 0) + 1
        return chosen

    def held(self, replica: Replica, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` ``replica`` is thought to hold."""
        table = self._tables.get(replica)
        return table.match(hashes) if table and table.epoch == replica.ready_since else 0

    def forget(self, replica: Replica) -> None:
        """Drop what ``replica`` was thought to hold: it restarted, slept, or left the pool."""
        table = self._tables.pop(replica, None)
        if table is not None:
            for value in table.blocks:
                self._release(value, table.bit)
            self._bits &= ~table.bit
            del self._owners[table.bit]

    def evict(self, replica: Replica, fraction: float) -> None:
        """Let go of the oldest ``fraction`` of what ``replica`` is thought to hold: its own
        cache evicted as much (``backends.kv_events``)."""
        table = self._tables.get(replica)
        if table is not None:
            self._evict(table, round(len(table.blocks) * min(1.0, fraction)))

    def prune(self, replicas: Collection[Replica]) -> None:
        """Forget every replica not in ``replicas`` (removed from the pool), counts included."""
        keep = set(replicas)
        for gone in self._tables.keys() - keep:
            self.forget(gone)
        for key in [k for k in self.routed if k[0] not in keep]:
            del self.routed[key]

    def remembered(self, replica: Replica) -> int:
        """Blocks remembered for ``replica`` (0 once it became ready again since)."""
        table = self._tables.get(replica)
        return len(table.blocks) if table and table.epoch == replica.ready_since else 0

    def _best_holder(
        self, candidates: Sequence[Replica], hashes: Sequence[int], count: int
    ) -> tuple[Replica | None, int]:
        """The candidate thought to hold the longest prefix of ``hashes`` (ties: the fewest
        in flight), and how many blocks long it is; None if no candidate holds the first."""
        tables, owners = self._tables, self._owners
        bits, held = self._longest(hashes, count, self._bits)
        if not bits & (bits - 1):  # one table holds it, or none (0): the common answers
            if not bits:
                return _NONE
            replica = owners[bits]
            if tables[replica].epoch == replica.ready_since and replica in candidates:
                return replica, held
        mask = self._bits
        while mask:
            bits, held = self._longest(hashes, count, mask)
            if not bits:
                break
            holders = [owners[b] for b in _each(bits)]
            stale = [r for r in holders if tables[r].epoch != r.ready_since]
            if stale:  # ready again since it learnt: what it held is gone
                for replica in stale:
                    self.forget(replica)
                mask &= self._bits
                continue
            able = [r for r in holders if r in candidates]
            if able:
                return min(able, key=_in_flight), held
            mask &= ~bits  # those may not take it: the longest prefix the others hold
        return _NONE

    def _longest(self, hashes: Sequence[int], last: int, mask: int) -> tuple[int, int]:
        """The bits (of ``mask``) of the tables holding the longest run of leading blocks of
        ``hashes``, and its length; (0, 0) if none holds the first. A table holding a block
        holds those before it (they are newer), so the run is found by binary search, after
        a look at the last two blocks: a conversation's next turn adds a block or two."""
        get = self._holders.get
        if found := get(hashes[last - 1], 0) & mask:
            return found, last
        if last > 1 and (found := get(hashes[last - 2], 0) & mask):
            return found, last - 1
        found = get(hashes[0], 0) & mask
        if not found:
            return 0, 0
        low, high = 1, last - 2  # hashes[:low] held by `found`; hashes[high:] not known
        while low < high:
            middle = (low + high + 1) // 2
            deeper = get(hashes[middle - 1], 0) & mask
            if deeper:
                low, found = middle, deeper
            else:
                high = middle - 1
        return found, low

    def _least(self, candidates: Sequence[Replica]) -> Replica:
        """The fewest in flight; ties to the replica that remembers least."""
        tables = self._tables
        least, least_key = candidates[0], (candidates[0].in_flight, 1 << 62)
        for replica in candidates:
            table = tables.get(replica)
            held = len(table.blocks) if table and table.epoch == replica.ready_since else 0
            key = (replica.in_flight, held)
            if key < least_key:
                least, least_key = replica, key
        return least

    def _overloaded(self, replica: Replica, candidates: Sequence[Replica]) -> bool:
        load, floor = replica.in_flight, int(min(map(_in_flight, candidates)))
        return load > floor + self.policy.slack and load > floor * self.policy.ratio

    def _table(self, replica: Replica) -> _Table:
        table = self._tables.get(replica)
        if table is None or table.epoch != replica.ready_since:
            self.forget(replica)  # what it held before it became ready again is gone
            bit = ~self._bits & (self._bits + 1)  # the lowest bit no table has
            self._bits |= bit
            self._owners[bit] = replica
            table = self._tables[replica] = _Table(replica.ready_since, bit)
        return table

    def _learn(
        self, table: _Table, hashes: Sequence[int], count: int, held: int, capacity: int
    ) -> None:
        """``table`` holds ``hashes`` now, their first blocks the most recently used (vLLM
        frees a request's last blocks first), so a block is never kept without those before
        it; ``held``: the leading blocks it held already.

        An approximate LRU, as CLOCK is, whose clock is the blocks written: when what it held
        was written within the last half of its capacity, those blocks keep their ticks (at
        least half of a full table is older, and goes first) and only the new ones are
        written, just older than the block before them. A prompt used that often is never
        the oldest, and most requests write nothing, nor read more than the hashes the
        search read (``backends.prompt_blocks``)."""
        blocks = table.blocks
        parent = blocks.get(hashes[held - 1]) if held else None
        new = hashes[held:] if held < count else ()  # the only hashes read beyond ``held``
        if parent is None or table.tick - parent >= capacity // 2:
            tick = table.tick = table.tick + count
            blocks.update(zip(hashes, range(tick, tick - count, -1), strict=True))  # in C
        elif new:
            table.tick += count - held
            ticks = range(parent - 1, parent - 1 - count + held, -1)
            blocks.update(zip(new, ticks, strict=True))
        if new:
            holders, bit = self._holders, table.bit
            for value in new:
                holders[value] = holders.get(value, 0) | bit

    def _evict(self, table: _Table, count: int) -> None:
        """Let go of the table's ``count`` least recently used blocks."""
        for value in table.oldest(count):
            del table.blocks[value]
            self._release(value, table.bit)

    def _release(self, value: int, bit: int) -> None:
        """The table with ``bit`` no longer holds block ``value``."""
        rest = self._holders.get(value, 0) & ~bit
        if rest:
            self._holders[value] = rest
        else:
            self._holders.pop(value, None)

    def _capacity(self, replica: Replica) -> int:
        """Its KV cache in blocks of text where the gateway knows its size, else the bound."""
        cache = replica.kv_cache
        if cache is None or not cache.actual_tokens:
            return self.policy.max_blocks
        held = cache.actual_tokens * TEXT_BYTES_PER_TOKEN // self.policy.block_bytes
        return max(1, min(self.policy.max_blocks, held))


_in_flight = attrgetter("in_flight")
_NONE: tuple[None, int] = (None, 0)


def _each(bits: int) -> Iterator[int]:
    """The set bits of ``bits``, lowest first."""
    while bits:
        low = bits & -bits
        yield low
        bits ^= low
