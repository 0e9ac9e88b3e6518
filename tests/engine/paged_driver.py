"""A minimal test driver for engine models: paged KV cache, block tables and AttentionMetadata, no runtime.

    driver = PagedDriver(loaded.model, loaded.spec, block_size=4)
    a = driver.add_sequence()
    logits = driver.step([(a, prompt_ids)])          # prefill (or a chunk of it)
    logits = driver.step([(a, [next_id]), (b, ...)])  # decode / mixed steps

Blocks are handed out from `block_order` (shuffle it to get non-contiguous block tables).
"""

from __future__ import annotations

import torch

from engine.layers.attention import AttentionMetadata, allocate_kv_cache


class PagedDriver:
    def __init__(self, model, spec, *, num_blocks: int = 128, block_size: int = 4, block_order=None):
        self.model, self.block_size = model, block_size
        dtype = next(model.parameters()).dtype
        self.kv_caches = allocate_kv_cache(
            spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim, dtype, "cpu"
        )
        self.free_blocks = list(block_order if block_order is not None else range(num_blocks))
        self.tokens: list[list[int]] = []
        self.block_tables: list[list[int]] = []

    def add_sequence(self, shared_prefix_of: int | None = None, prefix_blocks: int = 0) -> int:
        """A new sequence; optionally sharing the first `prefix_blocks` full blocks of another (a prefix hit)."""
        self.tokens.append([])
        self.block_tables.append([])
        seq = len(self.tokens) - 1
        if shared_prefix_of is not None:
            n = prefix_blocks * self.block_size
            self.tokens[seq] = list(self.tokens[shared_prefix_of][:n])
            self.block_tables[seq] = list(self.block_tables[shared_prefix_of][:prefix_blocks])
        return seq

    def metadata(self, chunks: list[tuple[int, list[int]]]):
        """Append each chunk to its sequence and build (input_ids, positions, AttentionMetadata)."""
        input_ids, positions, slots, query_lens, seq_lens = [], [], [], [], []
        for seq, chunk in chunks:
            start = len(self.tokens[seq])
            self.tokens[seq].extend(chunk)
            end = len(self.tokens[seq])
            table = self.block_tables[seq]
            while len(table) * self.block_size < end:
                table.append(self.free_blocks.pop(0))
            for pos in range(start, end):
                slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            input_ids.extend(chunk)
            positions.extend(range(start, end))
            query_lens.append(len(chunk))
            seq_lens.append(end)
        width = max(len(self.block_tables[seq]) for seq, _ in chunks)
        tables = [self.block_tables[seq] + [0] * (width - len(self.block_tables[seq])) for seq, _ in chunks]
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=self.block_size,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return torch.tensor(input_ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long), attn

    def step(self, chunks: list[tuple[int, list[int]]], all_positions: bool = False) -> torch.Tensor:
        """Run one step; float32 logits of each chunk's last token [B, vocab] (or of every token)."""
        input_ids, positions, attn = self.metadata(chunks)
        hidden = self.model(input_ids, positions, self.kv_caches, attn)
        if all_positions:
            return self.model.compute_logits(hidden)
        last = attn.query_start_loc[1:].long() - 1
        return self.model.compute_logits(hidden[last])

    def greedy(self, prompt: list[int], steps: int, chunk_size: int | None = None):
        """Prefill (in chunks if asked) then `steps` greedy decodes; (prompt logits, [step logits], tokens)."""
        seq = self.add_sequence()
        chunk_size = chunk_size or len(prompt)
        prompt_logits = []
        for start in range(0, len(prompt), chunk_size):
            prompt_logits.append(self.step([(seq, prompt[start : start + chunk_size])], all_positions=True))
        logits = [torch.cat(prompt_logits)[-1:]]
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[-1].argmax()))
            logits.append(self.step([(seq, [tokens[-1]])]))
        return torch.cat(prompt_logits), logits[:-1], tokens
