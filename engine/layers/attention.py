"""Paged attention: the KV cache pool, the per-step metadata, K/V writes and attention through block tables.

One rule covers every kind of step (see AttentionMetadata): sequence b's input tokens are the last
query_len tokens of its seq_len context, and each attends causally to every context position up to its own.

Paths:
- decode-only steps (every query_len == 1): one batched computation over all sequences (no Python loop);
  on CUDA the Triton kernel in engine/layers/triton_attention.py, elsewhere gather + batched matmul.
- steps with prefills (full, after a prefix-cache hit, chunked, mixed with decodes): the decodes go through
  the batched decode path; the prefills through one padded scaled_dot_product_attention call when padding
  costs at most twice the work (batch_prefills), else one call each over its own context.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional as F


@dataclass
class AttentionMetadata:
    """What attention needs to know about one step (all sequences flattened into T tokens).

    slot_mapping: [T] flat slot (block_id * block_size + offset) where each input token's K/V is written.
    query_start_loc: [B+1] cumulative number of input tokens per sequence in this step.
    seq_lens: [B] context length of each sequence INCLUDING this step's tokens.
    block_tables: [B, max_blocks_per_seq] physical block ids (padded with 0).
    query_lens_cpu / seq_lens_cpu: python copies so the CPU path needs no device syncs.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int
    block_size: int
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # Per-step values derived once and shared by all layers (filled lazily; not part of the contract).
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def allocate_kv_cache(
    num_layers: int,
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str | torch.device,
) -> list[torch.Tensor]:
    """One [2, num_blocks, block_size, num_kv_heads, head_dim] pool per layer (0 = keys, 1 = values)."""
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]


def kv_cache_bytes_per_block(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes one block costs across all layers (for sizing the pool from a memory budget)."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store this step's keys/values [T, kv_heads, head_dim] at their slots."""
    num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape[1:]
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write k/v [T, kv_heads, D] into the cache, then attend q [T, heads, D] -> [T, heads, D]."""
    write_kv(kv_cache, k, v, attn.slot_mapping)
    if attn.is_decode_only:
        return decode_attention(q, kv_cache, attn, scale)

    out = torch.empty_like(q)
    query_lens, seq_lens = attn.query_lens_cpu, attn.seq_lens_cpu
    starts = attn._derived.get("query_starts")
    if starts is None:
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        attn._derived["query_starts"] = starts
    decodes = [b for b, n in enumerate(query_lens) if n == 1]
    if decodes:
        rows = attn._derived.get("decode_rows")
        if rows is None:
            rows = attn._derived["decode_rows"] = torch.tensor(
                [starts[b] for b in decodes], dtype=torch.long, device=q.device
            )
            attn._derived["decode_seqs"] = torch.tensor(decodes, dtype=torch.long, device=q.device)
        seqs = attn._derived["decode_seqs"]
        out[rows] = _decode_torch(
            q[rows],
            kv_cache,
            attn.block_tables[seqs],
            attn.seq_lens[seqs],
            [seq_lens[b] for b in decodes],
            scale,
            attn._derived.setdefault("mixed_decodes", {}),
        )
    prefills = [b for b, n in enumerate(query_lens) if n > 1]
    if batch_prefills([query_lens[b] for b in prefills], [seq_lens[b] for b in prefills]):
        _prefill_batched(q, kv_cache, attn, prefills, starts, scale, out)
        return out
    for b in prefills:
        n, start, seq_len = query_lens[b], starts[b], seq_lens[b]
        if n == seq_len:  # nothing cached before: this step's own k/v are the whole context
            keys, values = k[start : start + n], v[start : start + n]
        else:
            keys, values = _gather_context(kv_cache, attn.block_tables[b], seq_len, attn.block_size)
        out[start : start + n] = _prefill_one(q[start : start + n], keys, values, seq_len, scale)
    return out


def batch_prefills(query_lens: list[int], seq_lens: list[int]) -> bool:
    """Whether a step's prefills go through one padded SDPA call rather than one call each: when there are
    several and padding them to the longest query and context at most doubles the attention work."""
    if len(query_lens) < 2:
        return False
    padded = len(query_lens) * max(query_lens) * max(seq_lens)
    return padded <= 2 * sum(n * s for n, s in zip(query_lens, seq_lens, strict=True))


def _prefill_batched(q, kv_cache, attn: AttentionMetadata, prefills: list[int], starts: list[int], scale: float,
                     out: torch.Tensor) -> None:
    """All prefills of the step in one SDPA call: queries padded to the longest chunk, contexts gathered
    through the block tables and padded to the longest, one boolean mask for causality, lengths and padding.
    The index and mask tensors are built once per step and shared by every layer."""
    derived = attn._derived.get("prefill_batch")
    device = q.device
    if derived is None:
        query_lens = [attn.query_lens_cpu[b] for b in prefills]
        seq_lens = [attn.seq_lens_cpu[b] for b in prefills]
        n_max, context = max(query_lens), max(seq_lens)
        num_blocks = -(-context // attn.block_size)
        rows = [[starts[b] + min(i, n - 1) for i in range(n_max)] for b, n in zip(prefills, query_lens, strict=True)]
        index = torch.tensor(rows, dtype=torch.long, device=device)  # [B, n_max]; padding repeats the last row
        n = torch.tensor(query_lens, device=device)[:, None, None]
        offset = torch.tensor([s - m for s, m in zip(seq_lens, query_lens, strict=True)], device=device)
        i = torch.arange(n_max, device=device)[None, :, None]
        j = torch.arange(context, device=device)[None, None, :]
        mask = (j <= offset[:, None, None] + torch.minimum(i, n - 1))[:, None]  # [B, 1, n_max, context]
        # The real (not padding) query rows, as flat positions in [B * n_max] and as rows of `out`: built from
        # host values, so no boolean indexing (a device sync per layer on CUDA) is needed to copy them out.
        sel = torch.tensor([b * n_max + i for b, m in enumerate(query_lens) for i in range(m)], device=device)
        dest = torch.tensor([starts[b] + i for b, m in zip(prefills, query_lens, strict=True) for i in range(m)],
                            device=device)
        seqs = torch.tensor(prefills, dtype=torch.long, device=device)
        block_ids = attn.block_tables[seqs, :num_blocks].reshape(-1).long()
        derived = attn._derived["prefill_batch"] = (index, mask, sel, dest, block_ids, context)
    index, mask, sel, dest, block_ids, context = derived
    batch, n_max = index.shape
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    kv = kv_cache.index_select(1, block_ids).view(2, batch, -1, num_kv_heads, head_dim)[:, :, :context]
    keys, values = kv[0].transpose(1, 2).to(q.dtype), kv[1].transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
    qb = q[index].transpose(1, 2)  # [B, H, n_max, D]
    o = F.scaled_dot_product_attention(qb, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    rows = o.transpose(1, 2).reshape(batch * n_max, o.shape[1], o.shape[3])  # [B * n_max, H, D]
    out.index_copy_(0, dest, rows.index_select(0, sel))


def _gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [seq_len, kv_heads, D] of one sequence, read through its block table."""
    num_blocks = -(-seq_len // block_size)
    blocks = kv_cache.index_select(1, block_table[:num_blocks].long())  # [2, n, block_size, kv_heads, D]
    blocks = blocks.flatten(1, 2)[:, :seq_len]
    return blocks[0], blocks[1]


def _prefill_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seq_len: int, scale: float):
    """q [n, H, D] are the last n positions of a seq_len context; causal attention over keys [seq_len, Hkv, D].

    The operands get a batch dimension of 1: on CPU only 4-D inputs reach ATen's flash-attention kernel, 3-D
    ones take the math path, which materialises the [H, n, seq_len] scores (5x slower at n = 1,024)."""
    n = q.shape[0]
    qt, kt, vt = (t.transpose(0, 1)[None].to(q.dtype) for t in (q, keys, values))  # [1, heads, len, D]
    if n == seq_len:
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float
) -> torch.Tensor:
    """Decode-only step: one query per sequence, q [B, H, D]."""
    block_size = kv_cache.shape[2]
    if q.is_cuda and block_size & (block_size - 1) == 0:  # the kernel tiles a block with tl.arange
        from engine.layers.triton_attention import paged_decode_attention

        return paged_decode_attention(q, kv_cache, attn.block_tables, attn.seq_lens, scale)
    return _decode_torch(
        q, kv_cache, attn.block_tables, attn.seq_lens, attn.seq_lens_cpu, scale, attn._derived
    )


def _decode_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    seq_lens_cpu: list[int],
    scale: float,
    derived: dict | None = None,
) -> torch.Tensor:
    """Batched decode attention in plain PyTorch: gather each sequence's blocks, mask past its length.

    index_select on the block dimension is several times faster than advanced indexing on CPU; the G query
    heads sharing a KV head are passed to SDPA as G query rows, so K/V are never repeated per head.
    """
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    num_blocks = -(-max(seq_lens_cpu) // block_size)
    context = num_blocks * block_size

    cached = derived.get("decode_gather") if derived is not None else None
    if cached is None:
        block_ids = block_tables[:, :num_blocks].reshape(-1).long()
        positions = torch.arange(context, device=q.device)
        mask = positions[None, :] < seq_lens[:, None].to(q.device)  # True = part of the context
        cached = (block_ids, mask[:, None, None, :])  # mask [B, 1, 1, L]
        if derived is not None:
            derived["decode_gather"] = cached
    block_ids, mask = cached

    kv = kv_cache.index_select(1, block_ids)  # [2, B * n, block_size, Hkv, D]
    keys = kv[0].view(batch, context, num_kv_heads, head_dim).transpose(1, 2)  # [B, Hkv, L, D]
    values = kv[1].view(batch, context, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.view(batch, num_kv_heads, group, head_dim)
    out = F.scaled_dot_product_attention(
        qg, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=scale
    )  # [B, Hkv, G, D]
    return out.reshape(batch, num_heads, head_dim)
