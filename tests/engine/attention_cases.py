"""Paged-attention test cases and the dense causal reference they are checked against.

Shared by tests/engine/test_paged_attention.py and the Triton check that runs in a TRITON_INTERPRET=1
subprocess (python -m tests.engine.attention_cases --triton).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from engine.layers.attention import AttentionMetadata, allocate_kv_cache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 16
SCALE = 1 / math.sqrt(HEAD_DIM)


def dense_reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] are the last n positions of a context keys/values [S, Hkv, D]; explicit causal softmax."""
    n, seq_len = q.shape[0], keys.shape[0]
    group = q.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)
    scores = (q.transpose(0, 1) @ k.transpose(1, 2)) * SCALE  # [H, n, S]
    allowed = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - n, seq_len)[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1)


@dataclass
class Case:
    """One step: per sequence (seq_len, query_len); the earlier context is already in the cache."""

    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, Hkv, D] this step's keys
    v: torch.Tensor
    kv_cache: torch.Tensor
    attn: AttentionMetadata
    expected: torch.Tensor  # [T, H, D]


def make_case(
    seqs: list[tuple[int, int]],
    block_size: int = 4,
    num_blocks: int = 64,
    seed: int = 0,
    shuffle: bool = True,
    num_heads: int = NUM_HEADS,
    num_kv_heads: int = NUM_KV_HEADS,
    head_dim: int = HEAD_DIM,
) -> Case:
    """Scores are scaled by SCALE whatever head_dim is."""
    gen = torch.Generator().manual_seed(seed)
    (kv_cache,) = allocate_kv_cache(1, num_blocks, block_size, num_kv_heads, head_dim, torch.float32, "cpu")
    kv_cache.normal_(generator=gen)  # garbage everywhere: unread slots must not matter
    order = torch.randperm(num_blocks, generator=gen).tolist() if shuffle else list(range(num_blocks))
    qs, ks, vs, expected, slots, tables = [], [], [], [], [], []
    for seq_len, query_len in seqs:
        keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        values = torch.randn(seq_len, num_kv_heads, head_dim, generator=gen)
        q = torch.randn(query_len, num_heads, head_dim, generator=gen)
        table = [order.pop() for _ in range(-(-seq_len // block_size))]
        seq_slots = [table[p // block_size] * block_size + p % block_size for p in range(seq_len)]
        cached = seq_len - query_len
        flat = kv_cache.view(2, -1, num_kv_heads, head_dim)
        flat[0, seq_slots[:cached]] = keys[:cached]
        flat[1, seq_slots[:cached]] = values[:cached]
        qs.append(q)
        ks.append(keys[cached:])
        vs.append(values[cached:])
        slots.extend(seq_slots[cached:])
        tables.append(table)
        expected.append(dense_reference(q, keys, values))
    width = max(len(t) for t in tables)
    query_lens = [n for _, n in seqs]
    seq_lens = [s for s, _ in seqs]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    return Case(torch.cat(qs), torch.cat(ks), torch.cat(vs), kv_cache, attn, torch.cat(expected))


DECODE_BATCH = [(1, 1), (5, 1), (16, 1), (17, 1), (33, 1), (8, 1)]


def check_triton_decode() -> None:
    """Run the Triton decode kernel (interpreted on CPU) against the dense reference."""
    import os

    from engine.layers import attention
    from engine.layers.triton_attention import _paged_decode_kernel, paged_decode_attention

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert type(_paged_decode_kernel).__name__ == "InterpretedFunction", type(_paged_decode_kernel)
    for block_size in (4, 16):
        case = make_case(DECODE_BATCH, block_size=block_size, seed=block_size)
        attention.write_kv(case.kv_cache, case.k, case.v, case.attn.slot_mapping)
        out = paged_decode_attention(case.q, case.kv_cache, case.attn.block_tables, case.attn.seq_lens, SCALE)
        torch.testing.assert_close(out, case.expected, atol=1e-5, rtol=1e-5)
    # multi-head (group 1), a group that is not a power of two (Qwen2.5-7B: 28 / 4) and head_dim 24
    for heads, kv_heads, dim in ((4, 4, 16), (14, 2, 24)):
        case = make_case(
            DECODE_BATCH, block_size=8, seed=heads, num_heads=heads, num_kv_heads=kv_heads, head_dim=dim
        )
        attention.write_kv(case.kv_cache, case.k, case.v, case.attn.slot_mapping)
        out = paged_decode_attention(case.q, case.kv_cache, case.attn.block_tables, case.attn.seq_lens, SCALE)
        torch.testing.assert_close(out, case.expected, atol=1e-5, rtol=1e-5)
    # bfloat16 cache and queries (the CUDA default dtype)
    case = make_case(DECODE_BATCH, block_size=8, seed=3)
    cache = case.kv_cache.to(torch.bfloat16)
    attention.write_kv(cache, case.k, case.v, case.attn.slot_mapping)
    out = paged_decode_attention(case.q.bfloat16(), cache, case.attn.block_tables, case.attn.seq_lens, SCALE)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), case.expected, atol=3e-2, rtol=3e-2)
    # split-KV: 2 and 3 splits (uneven shares), 16 (more splits than most sequences have blocks: empty
    # splits), over a table wider than any sequence needs (as in a captured graph); GQA group 3 padded to 4
    for splits, (heads, kv_heads, dim) in ((2, (6, 2, 16)), (3, (4, 4, 16)), (16, (6, 2, 16)), (5, (14, 2, 24))):
        case = make_case(DECODE_BATCH, block_size=4, seed=splits, num_heads=heads, num_kv_heads=kv_heads,
                         head_dim=dim)
        attention.write_kv(case.kv_cache, case.k, case.v, case.attn.slot_mapping)
        wide = torch.nn.functional.pad(case.attn.block_tables, (0, 7))
        out = paged_decode_attention(case.q, case.kv_cache, wide, case.attn.seq_lens, SCALE, num_splits=splits)
        torch.testing.assert_close(out, case.expected, atol=1e-5, rtol=1e-5)
    print("triton decode kernel: ok")


if __name__ == "__main__" and "--triton" in sys.argv:
    torch.set_num_threads(1)
    check_triton_decode()
