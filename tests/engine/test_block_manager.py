"""BlockManager: allocation, reference counts, prefix hits, cache salts, LRU eviction, collision safety."""

import pytest

from engine import block_manager as bm_module
from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 4


def make_seq(tokens, salt=None):
    return Sequence("r", list(tokens), SamplingParams(), max_tokens=16, cache_salt=salt)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """Allocate like the scheduler does on admission (cached prefix + the rest), then mark all computed."""
    cached = bm.find_cached_blocks(seq)
    n = seq.num_tokens - len(cached) * BS
    assert bm.can_allocate(seq, n, cached)
    bm.allocate(seq, n, cached)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)
    return cached


def test_allocation_covers_tokens_and_free_returns_blocks():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    admit(bm, seq)
    assert len(seq.block_table) == 3  # ceil(10 / 4)
    assert len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert all(bm.blocks[b].ref_count == 1 for b in seq.block_table)
    bm.free_blocks(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_prefix_hit_shares_blocks_with_refcounts():
    bm = BlockManager(16, BS)
    a = make_seq(list(range(100, 110)))  # 2 full blocks + 2 tokens
    admit(bm, a)
    b = make_seq(list(range(100, 108)) + [7, 7, 7])  # same first two blocks
    cached = admit(bm, b)
    assert cached == a.block_table[:2]
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.blocks[x].ref_count for x in a.block_table[:2]] == [2, 2]
    bm.free_blocks(a)
    assert [bm.blocks[x].ref_count for x in b.block_table[:2]] == [1, 1]  # still alive for b
    assert bm.prefix_hits == 8


def test_full_hit_still_leaves_the_last_token_to_compute():
    bm = BlockManager(16, BS)
    a = make_seq(range(8))  # exactly two full blocks
    admit(bm, a)
    b = make_seq(range(8))
    cached = bm.find_cached_blocks(b)
    assert len(cached) == 1  # the block holding the last token is recomputed
    bm.allocate(b, 8 - BS, cached)
    assert b.num_computed_tokens == 4 and len(b.block_table) == 2
    assert b.block_table[1] != a.block_table[1]  # never writes into a shared block


def test_cache_salt_separates_entries():
    bm = BlockManager(16, BS)
    admit(bm, make_seq(range(9), salt="org-a"))
    assert bm.find_cached_blocks(make_seq(range(9), salt="org-b")) == []
    assert bm.find_cached_blocks(make_seq(range(9))) == []
    assert len(bm.find_cached_blocks(make_seq(range(9), salt="org-a"))) == 2


@pytest.mark.parametrize("salt", ["XXXX", "org-a", " "])
def test_a_request_without_a_salt_never_shares_entries_with_a_salted_one(salt):
    """No salt is a namespace of its own: neither side finds the other's blocks, whatever the salt's text."""
    bm = BlockManager(16, BS)
    admit(bm, make_seq(range(9), salt=salt))
    assert bm.find_cached_blocks(make_seq(range(9))) == []
    admit(bm, make_seq(range(100, 109)))
    assert bm.find_cached_blocks(make_seq(range(100, 109), salt=salt)) == []


def test_model_key_separates_entries():
    a, b = BlockManager(16, BS, extra_key="model-a"), BlockManager(16, BS, extra_key="model-b")
    seq_a, seq_b = make_seq(range(9)), make_seq(range(9))
    admit(a, seq_a)
    admit(b, seq_b)
    assert seq_a.block_hashes[0] != seq_b.block_hashes[0]


def test_hash_is_chained_over_previous_blocks():
    bm = BlockManager(16, BS)
    admit(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    # Same second block, different first block: no hit at all.
    assert bm.find_cached_blocks(make_seq([0, 2, 3, 4, 5, 6, 7, 8, 9])) == []


def test_freed_blocks_stay_cached_and_lru_evicts_oldest_first():
    bm = BlockManager(6, BS)
    old, new = make_seq([1] * 4 + [0]), make_seq([2] * 4 + [0])
    admit(bm, old)
    admit(bm, new)
    bm.free_blocks(old)
    bm.free_blocks(new)
    assert len(bm.find_cached_blocks(make_seq([1] * 4 + [0]))) == 1
    assert len(bm.find_cached_blocks(make_seq([2] * 4 + [0]))) == 1
    # Need 5 fresh blocks out of 6: the 4 uncached ones go first, then the least recently freed (old's).
    filler = make_seq([9, 8, 7, 6] * 5)
    bm.allocate(filler, 20)
    assert bm.find_cached_blocks(make_seq([1] * 4 + [0])) == []
    assert len(bm.find_cached_blocks(make_seq([2] * 4 + [0]))) == 1


def test_reused_cached_block_is_moved_out_of_the_eviction_queue():
    bm = BlockManager(4, BS)
    a = make_seq([5] * 4 + [1])
    admit(bm, a)
    bm.free_blocks(a)
    b = make_seq([5] * 4 + [2])
    cached = admit(bm, b)
    assert cached and bm.blocks[cached[0]].ref_count == 1
    other = make_seq([3] * 8)
    assert not bm.can_allocate(other, 9)  # would need 3 blocks, only 2 are free
    bm.allocate(other, 8)
    assert bm.blocks[cached[0]].ref_count == 1 and bm.blocks[cached[0]].hash is not None


def test_blocks_filled_during_decode_become_cacheable():
    bm = BlockManager(16, BS)
    seq = make_seq(range(6))
    admit(bm, seq)
    for token in (50, 51, 52):  # generated tokens; each is computed in the next step
        seq.token_ids.append(token)
        bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        bm.cache_full_blocks(seq)
    assert seq.num_computed_tokens == 9
    probe = make_seq([0, 1, 2, 3, 4, 5, 50, 51, 52, 99])
    assert len(bm.find_cached_blocks(probe)) == 2


def test_hash_collision_never_serves_other_tokens(monkeypatch):
    monkeypatch.setattr(bm_module, "hash_block", lambda prev, tokens: b"same-hash-for-everything")
    bm = BlockManager(16, BS)
    admit(bm, make_seq([1, 2, 3, 4, 0]))
    assert bm.find_cached_blocks(make_seq([5, 6, 7, 8, 0])) == []  # same hash, other tokens: a miss
    assert len(bm.find_cached_blocks(make_seq([1, 2, 3, 4, 0]))) == 1


def test_prefix_caching_disabled():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    admit(bm, make_seq(range(9)))
    assert bm.find_cached_blocks(make_seq(range(9))) == [] and bm.cached == {}


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_can_allocate_counts_free_blocks(num_blocks):
    bm = BlockManager(num_blocks, BS)
    seq = make_seq(range(4 * num_blocks + 1))
    assert not bm.can_allocate(seq, seq.num_tokens)
    assert bm.can_allocate(seq, 4 * num_blocks)


def test_can_allocate_with_a_cached_prefix_counts_the_blocks_after_it():
    bm = BlockManager(4, BS)
    a = make_seq(range(9))  # 3 blocks, 2 of them cacheable
    admit(bm, a)
    b = make_seq(list(range(8)) + [50, 51, 52, 53, 54])  # 2 cached blocks + 5 new tokens = 2 more blocks
    cached = bm.find_cached_blocks(b)
    assert len(cached) == 2
    assert bm.blocks_needed(b, 5, cached) == 2
    assert not bm.can_allocate(b, 5, cached)  # only 1 block is free
    bm.free_blocks(a)
    assert bm.blocks_needed(b, 5, cached) == 4  # the cached ones now come out of the free pool too
    assert bm.can_allocate(b, 5, cached)
    bm.allocate(b, 5, cached)
    assert len(b.block_table) == 4 and bm.num_free_blocks == 0


# -- blocks a scheduled chunk fills are findable in the same step -----------------------------------


def schedule_chunk(bm: BlockManager, seq: Sequence, n: int) -> list[int]:
    """Allocate like the scheduler does on admission, without running the step (nothing computed yet)."""
    cached = bm.find_cached_blocks(seq)
    assert bm.can_allocate(seq, n, cached)
    bm.allocate(seq, n, cached)
    return cached


def test_blocks_a_scheduled_chunk_will_fill_are_found_before_the_step_runs():
    bm = BlockManager(16, BS)
    a = make_seq(range(100, 110))  # 2 full blocks + 2 tokens
    schedule_chunk(bm, a, 10)
    b = make_seq(range(100, 110))  # the same prompt, admitted in the same step
    cached = schedule_chunk(bm, b, 2)
    assert cached == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.block_table[2] != a.block_table[2]
    assert bm.num_free_blocks == 16 - 4  # a's 3 blocks + b's own last block
    assert bm.prefix_queries == 20 and bm.prefix_hits == 8


def test_only_blocks_the_chunk_fills_completely_are_registered():
    bm = BlockManager(16, BS)
    a = make_seq(range(100, 112))  # 3 full blocks
    schedule_chunk(bm, a, 6)  # a chunk of 6: fills block 0, half of block 1
    assert len(bm.find_cached_blocks(make_seq(range(100, 112)))) == 1
    a.num_computed_tokens += 6
    bm.cache_full_blocks(a)
    bm.allocate(a, 6)  # the next chunk fills blocks 1 and 2
    assert len(bm.find_cached_blocks(make_seq(range(100, 113)))) == 3


def test_a_block_registered_at_allocation_but_never_computed_is_not_served_after_free():
    bm = BlockManager(8, BS)
    a = make_seq(range(100, 110))
    schedule_chunk(bm, a, 10)
    bm.free_blocks(a)  # preempted or aborted before its step ran: the blocks hold no K/V
    assert bm.find_cached_blocks(make_seq(range(100, 110))) == []
    assert bm.cached == {} and all(bm.blocks[b].hash is None for b in range(8))


def test_computed_blocks_stay_cached_after_free_while_the_uncomputed_tail_does_not():
    bm = BlockManager(8, BS)
    a = make_seq(range(100, 117))  # 4 full blocks + 1 token
    schedule_chunk(bm, a, 8)
    a.num_computed_tokens += 8  # the first chunk ran
    bm.cache_full_blocks(a)
    bm.allocate(a, 8)  # the second chunk is scheduled, then a is freed before it runs
    bm.free_blocks(a)
    assert len(bm.find_cached_blocks(make_seq(range(100, 117)))) == 2


# -- mutation round 5: behaviours the survivors showed unpinned ------------------------------------


def test_a_block_is_named_by_its_whole_prefix_not_by_its_own_tokens():
    """The hash chain: a block reused from the cache must have been computed after the same earlier
    tokens. Prompts A = [a0, a1, x] and C = [a0, b1, y] are cached; B = [a0, b1, x] finds a0 and b1 (C's),
    not A's x block, whose K/V were computed after a1."""
    a0, a1, b1, x, y = ([v] * BS for v in (1, 2, 3, 4, 5))
    bm = BlockManager(32, BS)
    first, second = make_seq(a0 + a1 + x + [9]), make_seq(a0 + b1 + y + [9])
    admit(bm, first)
    admit(bm, second)
    assert bm.find_cached_blocks(make_seq(a0 + b1 + x + [9])) == second.block_table[:2]


def test_a_block_registered_for_a_chunk_that_never_ran_leaves_the_cache_on_free():
    """10 tokens computed; a 2-token chunk that fills block 2 is scheduled (registered at allocation),
    then the sequence is preempted before the step: block 2's K/V are incomplete, so it is not findable."""
    bm = BlockManager(16, BS)
    seq = make_seq(range(1, 13))
    bm.allocate(seq, 10)
    seq.num_computed_tokens = 10
    bm.allocate(seq, 2)  # fills block 2: registered now
    bm.free_blocks(seq)
    assert len(bm.find_cached_blocks(make_seq(range(1, 14)))) == 2


def test_a_freed_block_holding_nothing_reusable_is_handed_out_before_cached_ones():
    """Eviction order: a freed tail block (nothing cached in it) goes to the front of the free list, ahead
    of cached blocks freed before it, so the next allocation takes it and the cached prefix stays."""
    bm = BlockManager(3, BS)
    cached_first, second = make_seq(range(1, 5)), make_seq(range(20, 26))  # 1 full block; 1 full + a tail
    admit(bm, cached_first)
    admit(bm, second)
    [first_block], tail = cached_first.block_table, second.block_table[1]
    bm.free_blocks(cached_first)  # its full block: cached, at the end of the free list
    bm.free_blocks(second)  # its tail: uncached, to the front
    other = make_seq([50, 51, 52])
    bm.allocate(other, 3)
    assert other.block_table == [tail]
    assert bm.find_cached_blocks(make_seq([*range(1, 5), 9])) == [first_block]
    assert len(bm.find_cached_blocks(make_seq([*range(20, 26), 9]))) == 1


def test_a_sequence_freed_and_admitted_again_after_eviction_registers_its_blocks_again():
    """free_blocks resets what the sequence registered: admitted again with nothing cached (its blocks were
    evicted meanwhile), its full blocks are offered to the cache again from the first."""
    bm = BlockManager(3, BS)
    seq = make_seq(range(1, 10))  # blocks: 2 full + a tail
    admit(bm, seq)
    bm.free_blocks(seq)
    evictor = make_seq(range(100, 112))  # 3 blocks: evicts every block of seq
    admit(bm, evictor)
    bm.free_blocks(evictor)
    assert bm.find_cached_blocks(make_seq(range(1, 10))) == []
    assert admit(bm, seq) == []
    assert bm.find_cached_blocks(make_seq(range(1, 10))) == seq.block_table[:2]


def test_reset_stats_zeroes_the_prefix_counters():
    bm = BlockManager(8, BS)
    admit(bm, make_seq(range(1, 10)))
    bm.find_cached_blocks(make_seq(range(1, 10)))
    assert (bm.prefix_queries, bm.prefix_hits) == (18, 8)
    bm.reset_stats()
    assert (bm.prefix_queries, bm.prefix_hits) == (0, 0)
