"""The KV block pool: which physical blocks each sequence owns, and the prefix cache over full blocks.

A full block is named by a SHA-256 chained over the previous block's hash and its token ids; the chain
starts from a hash of the model key and the request's cache salt, so different models or tenants never
share entries. A hit is also confirmed against the token ids the block holds. Freed blocks keep their
contents and stay findable until the pool needs them; the least recently freed is reused first.

A block is registered when it is allocated for a chunk that fills it, before the step runs, so a sequence
admitted later in the same step (the other choices of an n > 1 request, or another request with the same
prompt) takes it as a cached block instead of computing the prefix again. That is safe within one forward
pass: every attention layer writes the K/V of all the step's tokens into the pool before any sequence
reads its context through its block table (engine/layers/attention.py, paged_attention), so the later
sequence reads, at each layer, what the earlier one has just written at that layer. A block whose sequence
is freed before its chunk ran (its K/V were never written) is unregistered on free.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] | None = None


def hash_block(prev_hash: bytes, token_ids) -> bytes:
    return hashlib.sha256(prev_hash + array("q", token_ids).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 extra_key: str = ""):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.extra_key = extra_key
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently freed first (the eviction order).
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found in the cache

    # -- prefix cache ---------------------------------------------------------------------------
    def root_hash(self, cache_salt: str | None) -> bytes:
        return hashlib.sha256(f"{self.extra_key}\x00{cache_salt or ''}".encode()).digest()

    def _block_hash(self, seq: Sequence, i: int) -> bytes:
        """Hash of the seq's i-th full block; hashes are memoized on the sequence in order."""
        hashes = seq.block_hashes
        while len(hashes) <= i:
            j = len(hashes)
            prev = hashes[j - 1] if j else self.root_hash(seq.cache_salt)
            hashes.append(hash_block(prev, seq.token_ids[j * self.block_size:(j + 1) * self.block_size]))
        return hashes[i]

    def find_cached_blocks(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix, leaving at least the last token to compute."""
        if not self.enable_prefix_caching:
            return []
        bs = self.block_size
        found: list[int] = []
        for i in range((seq.num_tokens - 1) // bs):
            block_id = self.cached.get(self._block_hash(seq, i))
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs:(i + 1) * bs]):
                break  # a hash collision: never serve another prompt's KV
            found.append(block_id)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(found) * bs
        return found

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer the blocks this sequence has filled completely to the prefix cache (those registered at
        allocation already are skipped)."""
        self._register(seq, seq.num_computed_tokens // self.block_size)

    def _register(self, seq: Sequence, num_full: int) -> None:
        """Offer the seq's first `num_full` blocks (full, or filled by the chunk being scheduled)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                block_hash = self._block_hash(seq, i)
                if block_hash not in self.cached:  # else an identical block is already cached
                    block.hash = block_hash
                    block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                    self.cached[block_hash] = block.block_id
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    # -- allocation -----------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> int:
        """Free-pool blocks an allocation would consume (cached blocks sitting in the pool count too)."""
        computed = seq.num_computed_tokens + len(cached_blocks) * self.block_size
        total = -(-(computed + num_new_tokens) // self.block_size)
        fresh = total - len(seq.block_table) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        return max(fresh, 0) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        return self.blocks_needed(seq, num_new_tokens, cached_blocks) <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_blocks: list[int] = ()) -> None:
        """Give `seq` blocks for `num_new_tokens` more tokens, first taking the cached prefix blocks.

        The caller schedules those tokens in this step: the blocks they fill completely are registered in
        the prefix cache now (see the module docstring for why a same-step hit is safe)."""
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if cached_blocks:
            seq.num_computed_tokens = len(seq.block_table) * self.block_size
            seq.num_registered_blocks = len(seq.block_table)
        end = seq.num_computed_tokens + num_new_tokens
        total = -(-end // self.block_size)
        for _ in range(total - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())
        self._register(seq, end // self.block_size)

    def _take_free_block(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        self._uncache(self.blocks[block_id])
        self.blocks[block_id].ref_count = 1
        return block_id

    def _uncache(self, block: Block) -> None:
        if block.hash is not None:
            if self.cached.get(block.hash) == block.block_id:
                del self.cached[block.hash]
            block.hash = None
            block.token_ids = None

    def free_blocks(self, seq: Sequence) -> None:
        """Release the sequence's blocks; cached ones stay findable, tail blocks are evicted first.

        Blocks past the computed ones were registered for a chunk that has not run (the sequence is
        preempted, aborted or failed between scheduling and the end of its step): their K/V may never have
        been written, so they leave the prefix cache. (Cached prefix blocks a sequence took count as
        computed: they lie below num_computed_tokens.)"""
        num_computed_blocks = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_table) - 1, -1, -1):
            block_id = seq.block_table[i]
            block = self.blocks[block_id]
            if i >= num_computed_blocks:
                self._uncache(block)
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:  # holds nothing reusable: hand it out before cached blocks
                    self.free.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0

    def reset_stats(self) -> None:
        self.prefix_queries = self.prefix_hits = 0
