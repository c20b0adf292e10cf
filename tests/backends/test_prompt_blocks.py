"""A prompt's block hashes, read lazily: whichever way they are read (one at a time, a tail,
all at once, in any order), they are the same hashes, so the index never sees two names for
one block."""

from __future__ import annotations

import random

import pytest

from backends.prompt_blocks import PromptBlocks, seed_of

BLOCK = 16


def blocks(data: bytes, adapter: str | None = None) -> PromptBlocks:
    return PromptBlocks(data, BLOCK, seed_of(adapter))


def test_each_hash_read_alone_is_the_one_computed_in_one_pass() -> None:
    rng = random.Random(3)
    for size in (0, 15, 16, 17, 160, 999):
        data = rng.randbytes(size)
        whole = blocks(data).all()
        assert len(whole) == size // BLOCK
        order = list(range(len(whole)))
        rng.shuffle(order)
        lazy = blocks(data)
        assert [lazy[i] for i in order] == [whole[i] for i in order]
        assert [lazy[-1 - i] for i in range(len(whole))] == list(reversed(whole))
        for start in range(len(whole) + 1):
            assert tuple(blocks(data)[start:]) == whole[start:]  # a tail alone, then after all
            assert tuple(lazy[start:]) == whole[start:]
        assert lazy == whole and list(lazy) == list(whole)


def test_a_hash_names_its_block_and_every_block_before_it() -> None:
    a = blocks(b"x" * 48)
    assert blocks(b"x" * 32 + b"y" * 8) == a.all()[:2]  # same full blocks, same hashes
    assert blocks(b"y" * 16 + b"x" * 32)[1] != a[1]  # another first block: another name
    assert len({*a}) == 3  # equal blocks in other places are other names


def test_an_adapters_hashes_are_its_own() -> None:
    data = b"z" * 64
    assert blocks(data, "sql").all() != blocks(data).all()
    assert blocks(data, None).all() == blocks(data, "").all()


def test_a_prompt_shorter_than_a_block_has_no_hashes() -> None:
    short = blocks(b"x" * (BLOCK - 1))
    assert len(short) == 0 and not short and short.all() == ()
    with pytest.raises(IndexError):
        short[0]
    with pytest.raises(IndexError):
        blocks(b"x" * BLOCK)[1]
