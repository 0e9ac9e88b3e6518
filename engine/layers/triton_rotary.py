"""Triton rotary embedding ("rotate_half" layout): one kernel instead of PyTorch's five (neg, cat, two muls,
add) per layer. Rounds as the PyTorch expression in engine/layers/rotary.py does in 16-bit dtypes (each
product and the sum rounded to the dtype; bfloat16 by hand, see triton_norm._round_bf16). Runs on CUDA, and
on CPU under TRITON_INTERPRET=1 (tests/engine/norm_check.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.layers.triton_norm import _round_bf16


@triton.jit
def _to_dtype(x, BF16: tl.constexpr, HALF: tl.constexpr):
    if BF16:
        return _round_bf16(x)
    if HALF:
        return x.to(tl.float16).to(tl.float32)
    return x


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xt, stride_xh, stride_ct, stride_ot,
                   stride_oh, HALF_DIM: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                   BF16: tl.constexpr, HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF_DIM)[None, :]
    x_row = x_ptr + token * stride_xt + heads[:, None] * stride_xh + dims[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
    c_row = token * stride_ct + dims
    cos1 = tl.load(cos_ptr + c_row, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + c_row + HALF_DIM, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + c_row, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + c_row + HALF_DIM, mask=dims < HALF_DIM, other=0.0).to(tl.float32)[None, :]
    # out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
    out1 = _to_dtype(_to_dtype(x1 * cos1, BF16, HALF) + _to_dtype(-x2 * sin1, BF16, HALF), BF16, HALF)
    out2 = _to_dtype(_to_dtype(x2 * cos2, BF16, HALF) + _to_dtype(x1 * sin2, BF16, HALF), BF16, HALF)
    o_row = out_ptr + token * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(o_row, out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF_DIM, out2.to(out_ptr.dtype.element_ty), mask=mask)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] (rows may be strided, the last dim contiguous), cos/sin [T, 1, head_dim] of
    x's dtype -> a new contiguous [T, heads, head_dim]."""
    tokens, num_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.reshape(tokens, head_dim), sin.reshape(tokens, head_dim)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(tokens, num_heads, head_dim, dtype=x.dtype, device=x.device)
    half = head_dim // 2
    block_h = min(triton.next_power_of_2(num_heads), 16)
    _rotary_kernel[(tokens, triton.cdiv(num_heads, block_h))](
        x, cos, sin, out, num_heads, x.stride(0), x.stride(1), cos.stride(0), out.stride(0), out.stride(1),
        HALF_DIM=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h,
        BF16=x.dtype == torch.bfloat16, HALF=x.dtype == torch.float16,
    )  # fmt: skip
    return out
