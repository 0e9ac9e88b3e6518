"""Triton paged decode attention: one query token per sequence, keys/values read through block tables.

One program per (sequence, KV head, split) handles the GROUP query heads that share that KV head (GQA),
walking its share of the sequence's blocks with an online softmax, so K/V are read once per KV head. With
one split that is the whole answer; with several (split-KV, "flash-decoding"), each split writes its
unnormalised partial result and a second kernel combines them — so a small batch (batch 1 has only
kv_heads programs per layer otherwise) still spreads over the GPU's multiprocessors. The split count depends
only on the batch shape and the block table's width, never on sequence lengths, so a captured CUDA graph
stays valid; a split with no blocks (a short sequence) contributes nothing. Runs on CUDA, and on CPU under
TRITON_INTERPRET=1 (how its tests run).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks]
    seq_lens_ptr,  # [B]
    out_ptr,  # [B, H, D]
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)

    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    offsets = tl.arange(0, BLOCK_SIZE)
    head_mask = groups < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + groups

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)

    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    for i in range(0, num_blocks):
        block = tl.load(block_tables_ptr + seq * stride_tb + i).to(tl.int64)
        positions = i * BLOCK_SIZE + offsets
        valid = positions < seq_len
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(
            k_cache_ptr
            + block * stride_kb
            + offsets[:, None] * stride_ks
            + kv_head * stride_kh
            + dims[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(tl.float32)  # [BLOCK_SIZE, DIM_PAD]
        v = tl.load(
            v_cache_ptr
            + block * stride_vb
            + offsets[:, None] * stride_vs
            + kv_head * stride_vh
            + dims[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_mask[:, None] & dim_mask[None, :],
    )


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # [B, H, D]
    k_cache_ptr,  # [num_blocks, block_size, Hkv, D]
    v_cache_ptr,
    block_tables_ptr,  # [B, max_blocks]
    seq_lens_ptr,  # [B]
    acc_ptr,  # [B, H, S, DIM_PAD] float32, unnormalised; S = the grid's third axis, the split count
    m_ptr,  # [B, H, S] float32: running max of the scores
    l_ptr,  # [B, H, S] float32: sum of exp(score - max)
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)  # not a constexpr: one compile serves every split count
    seq_len = tl.load(seq_lens_ptr + seq)

    groups = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, DIM_PAD)
    offsets = tl.arange(0, BLOCK_SIZE)
    head_mask = groups < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + groups

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    q = q * scale

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], dtype=tl.float32)

    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    per_split = tl.cdiv(num_blocks, num_splits)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)
    for i in range(first, last):
        block = tl.load(block_tables_ptr + seq * stride_tb + i).to(tl.int64)
        positions = i * BLOCK_SIZE + offsets
        valid = positions < seq_len
        kv_mask = valid[:, None] & dim_mask[None, :]
        k = tl.load(
            k_cache_ptr + block * stride_kb + offsets[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_cache_ptr + block * stride_vb + offsets[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
            mask=kv_mask,
            other=0.0,
        ).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    row = (seq * GROUP * tl.num_programs(1) + heads) * num_splits + split  # [GROUP_PAD] in [B, H, S]
    tl.store(m_ptr + row, m_i, mask=head_mask)
    tl.store(l_ptr + row, l_i, mask=head_mask)
    tl.store(acc_ptr + row[:, None] * DIM_PAD + dims[None, :], acc, mask=head_mask[:, None])


@triton.jit(do_not_specialize=["num_splits"])
def _combine_splits_kernel(
    acc_ptr,  # [B, H, S, DIM_PAD]
    m_ptr,  # [B, H, S]
    l_ptr,
    out_ptr,  # [B, H, D]
    stride_ob,
    stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SPLIT_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLIT_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_mask = splits < num_splits
    row = (seq * tl.num_programs(1) + head) * num_splits + splits
    m = tl.load(m_ptr + row, mask=split_mask, other=float("-inf"))
    lsum = tl.load(l_ptr + row, mask=split_mask, other=0.0)
    acc = tl.load(acc_ptr + row[:, None] * DIM_PAD + dims[None, :], mask=split_mask[:, None], other=0.0)
    m_max = tl.max(m, axis=0)  # finite: the first split always holds the first block
    w = tl.where(split_mask & (lsum > 0), tl.exp(m - m_max), 0.0)  # an empty split (m = -inf) weighs 0
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


MAX_SPLITS = 16


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # interpreter: a small number still exercises the split path


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, table_width: int, device: torch.device) -> int:
    """Splits per (sequence, KV head): enough programs for about two per multiprocessor, no more splits than
    the table has blocks, at most MAX_SPLITS, rounded down to a power of two.
    Depends on shapes only, so a CUDA graph replays it for any sequence lengths."""
    wanted = min(MAX_SPLITS, table_width, (2 * _num_sms(device)) // (batch * num_kv_heads))
    return 1 << (max(1, wanted).bit_length() - 1)


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, H, D], kv_cache [2, num_blocks, block_size, Hkv, D] -> [B, H, D]. block_size: a power of two.

    num_splits: None picks it from the shapes (choose_num_splits); 1 is the single-pass kernel."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    if block_size & (block_size - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two block size, got {block_size}")
    group = num_heads // num_kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1], q.device)
    common = dict(GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim,
                  DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size)
    if num_splits == 1:
        _paged_decode_kernel[(batch, num_kv_heads)](
            q, k_cache, v_cache, block_tables, seq_lens, out, scale,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), **common,
        )  # fmt: skip
        return out
    dim_pad = common["DIM_PAD"]
    acc = torch.empty(batch, num_heads, num_splits, dim_pad, dtype=torch.float32, device=q.device)
    m = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    lse = torch.empty_like(m)
    _paged_decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, acc, m, lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), **common,
    )  # fmt: skip
    _combine_splits_kernel[(batch, num_heads)](
        acc, m, lse, out, out.stride(0), out.stride(1), num_splits, HEAD_DIM=head_dim, DIM_PAD=dim_pad,
        SPLIT_PAD=triton.next_power_of_2(max(num_splits, MAX_SPLITS)),
    )  # fmt: skip
    return out
