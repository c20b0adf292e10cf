"""A prompt's block hashes for the prefix index (``backends.prefix_index``), computed only as
the index asks for them.

The prompt (a stable byte rendering of it, ``gateway.prompt_prefix``) is cut in fixed-size
blocks; block ``k``'s hash names the prompt's first ``k + 1`` blocks: xxHash's XXH3 (64 bits)
over those bytes, seeded by the adapter's (a LoRA adapter's cache is its own). So a block's
hash names everything before it, as vLLM's chained block hashes do, and any one of them is
one call in C over the prompt's head. A trailing partial block is not hashed (vLLM caches full
blocks only): a short prompt costs nothing.

The index looks at a prompt's last blocks first, and a conversation's next turn is mostly
held already, so most requests ask for one or two hashes; all of them are computed (in one
pass, XXH3's streaming state giving each block's digest on the way) only when the index
learns new blocks or searches. A collision costs one routing choice, never a wrong answer.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

from xxhash import xxh3_64, xxh3_64_intdigest


def seed_of(adapter: str | None) -> int:
    """The seed of a base model's (``None``) or an adapter's hashes."""
    return xxh3_64_intdigest((adapter or "").encode())


class PromptBlocks(Sequence[int]):
    """The hashes of ``data``'s full blocks of ``block_bytes``, each computed when first read."""

    __slots__ = ("_all", "_count", "_data", "_known", "_seed", "_size")

    def __init__(self, data: bytes, block_bytes: int, seed: int) -> None:
        self._data = data
        self._size = block_bytes
        self._seed = seed
        self._count = count = len(data) // block_bytes
        self._all: tuple[int, ...] | None = None
        # index -> hash, of those read one by one; the last block's first: the index reads it
        # for every request, so it is hashed here, in C
        self._known = {count - 1: xxh3_64_intdigest(self._head(count), seed)} if count else {}

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...

    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        if isinstance(index, slice):
            start, stop, step = index.indices(self._count)
            if self._all is None and step == 1 and stop == self._count:
                return self._tail(start)  # what the index learns: the blocks after those held
            return self.all()[index]
        if index < 0:
            index += self._count
        found = self._known.get(index)
        if found is not None:
            return found
        if not 0 <= index < self._count:
            raise IndexError("block index out of range")
        if self._all is not None:
            return self._all[index]
        found = self._known[index] = xxh3_64_intdigest(self._head(index + 1), self._seed)
        return found

    def __iter__(self) -> Iterator[int]:
        return iter(self.all())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return self.all() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to a tuple, yet not one

    def __repr__(self) -> str:
        return f"PromptBlocks({self._count} blocks of {self._size} bytes)"

    def all(self) -> tuple[int, ...]:
        """Every block's hash, in one pass."""
        if self._all is None:
            self._all = self._tail(0)
        return self._all

    def _head(self, blocks: int) -> bytes:
        """The prompt's first ``blocks`` blocks."""
        end = blocks * self._size
        return self._data if end == len(self._data) else self._data[:end]

    def _tail(self, start: int) -> tuple[int, ...]:
        """The hashes of blocks ``start`` on: the head before them hashed in one call, then
        each block's digest as the state passes it (the blocks cut in C)."""
        size = self._size
        state = xxh3_64(self._head(start), seed=self._seed)
        hashes: list[int] = []
        update, digest, append = state.update, state.intdigest, hashes.append
        for (block,) in _unpacker(size)(self._data[start * size : self._count * size]):
            update(block)
            append(digest())
        return tuple(hashes)


@functools.cache
def _unpacker(block_bytes: int) -> Callable[[bytes], Iterator[tuple[Any, ...]]]:
    return struct.Struct(f"{block_bytes}s").iter_unpack
