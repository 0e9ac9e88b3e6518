"""Triton RMSNorm: one program per row, the row in registers, float32 statistics.

y = weight * round(x * rsqrt(mean(x^2) + eps)), with the products in float32 and rounded to x's dtype as
PyTorch does for the reference expression (engine/layers/norm.py). Runs on CUDA, and on CPU under
TRITON_INTERPRET=1 (tests/engine/norm_check.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _round_bf16(x):
    """float32 rounded to the nearest bfloat16 (ties to even), kept in float32. By hand because Triton's
    interpreter truncates float32 -> bfloat16 casts where the GPU rounds: this way both agree with PyTorch."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr,
                     BF16: tl.constexpr, HALF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    h = x * rstd
    if BF16:
        h = _round_bf16(h)
    elif HALF:
        h = h.to(tl.float16).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * h
    if BF16:
        y = _round_bf16(y)  # exactly representable now: the store's cast cannot change it
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of x (any leading shape); weight [hidden] of x's dtype."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, rows.stride(0), out.stride(0), hidden, eps, BLOCK=block,
        BF16=x.dtype == torch.bfloat16, HALF=x.dtype == torch.float16, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out.view(x.shape)
