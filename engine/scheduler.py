"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step spends at most `max_num_batched_tokens`: running sequences go first, oldest first (one token
each when decoding, a chunk when still prefilling), then waiting ones are admitted in arrival order with
whatever budget is left, a long prompt taking a chunk per step. When the pool runs dry the newest running
sequence is preempted: its blocks are freed and it is recomputed later (its full blocks usually survive in
the prefix cache, so the recompute is mostly cache hits).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # A sequence can never outgrow the whole pool: past this it stops with finish_reason "length".
        self.max_model_len = min(max_model_len, block_manager.num_blocks * block_manager.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def prompt_fits(self, num_prompt_tokens: int) -> bool:
        """Whether a prompt can ever be scheduled (it must leave room for one generated token)."""
        return num_prompt_tokens < self.max_model_len

    def schedule(self) -> ScheduledBatch:
        """This step's sequences and token counts. Allocation registers the blocks each chunk will fill,
        so a sequence admitted after another with the same prompt (the choices of an n > 1 request)
        takes that prefix as cached blocks in this very step and computes only its tail; the forward
        pass writes every layer's K/V before any sequence reads them (see engine/block_manager.py)."""
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        preempted = False
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not bm.can_allocate(seq, n):
                victim = running.pop()  # the newest
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.allocate(seq, n)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(n)
                budget -= n
                i += 1
        if preempted:
            return batch
        while self.waiting and budget > 0 and len(running) < self.max_num_seqs:
            seq = self.waiting[0]
            lookup = seq.num_computed_tokens == 0 and not seq.wants_prompt_logprobs
            cached = bm.find_cached_blocks(seq) if lookup else []
            n = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.can_allocate(seq, n, cached):
                bm.prefix_queries -= seq.num_tokens  # not admitted: don't count the lookup
                bm.prefix_hits -= len(cached) * bm.block_size
                break
            self.waiting.popleft()
            bm.allocate(seq, n, cached)
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.perf_counter()
            running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Record a finished step: advance computed counts and append sampled tokens (seq_id -> token).
        Returns the sequences that got a new token; whether they finish is `LLMEngine.finish_reason`'s
        decision (the one place that knows stop strings as well as stop tokens and lengths)."""
        bm = self.block_manager
        grown = []
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted meanwhile
            seq.num_computed_tokens += n
            bm.cache_full_blocks(seq)
            token = sampled.get(seq.seq_id)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt, or a failed sample
            seq.token_ids.append(token)
            grown.append(seq)
        return grown

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a sequence (finished, stopped by a string, or aborted) and free its blocks now."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
