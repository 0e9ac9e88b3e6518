"""Triton W4A16 / W8A16 GEMMs: the weight tile is dequantized in registers right before tl.dot.

Decode (small M) is bound by reading the weight once: a 16-row M tile and split-K spread the K loop over
enough programs to keep every SM streaming, partial sums meet in a float32 output through atomic adds.
Prefill (large M) uses bigger M/N tiles and no split. Both run on CPU tensors under TRITON_INTERPRET=1
(set before triton is imported), which is how the tests check them without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.quant.weights import Int4Weight, Int8Weight


@triton.jit
def _w4a16_kernel(
    x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, group_size,
    stride_xm, stride_qk, stride_sg, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        mask_w = mask_k[:, None] & mask_n[None, :]
        q = tl.load(q_ptr + (offs_k[:, None] // 8) * stride_qk + offs_n[None, :], mask=mask_w, other=0)
        q = (q >> ((offs_k[:, None] % 8) * 4)) & 0xF
        g = offs_k[:, None] // group_size
        s = tl.load(s_ptr + g * stride_sg + offs_n[None, :], mask=mask_w, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + g * stride_sg + offs_n[None, :], mask=mask_w, other=0.0).to(tl.float32)
        w = q.to(tl.float32) * s + b
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask_y)


@triton.jit
def _w8a16_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, group_size,
    stride_xm, stride_qn, stride_sn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_F32: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # fmt: skip
        mask_w = mask_k[:, None] & mask_n[None, :]
        q = tl.load(q_ptr + offs_n[None, :] * stride_qn + offs_k[:, None], mask=mask_w, other=0.0)
        s = tl.load(
            s_ptr + offs_n[None, :] * stride_sn + offs_k[:, None] // group_size, mask=mask_w, other=0.0
        )
        w = q.to(tl.float32) * s.to(tl.float32)
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        tl.atomic_add(y_ptrs, acc, mask=mask_y)


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def _dot_f32(x: torch.Tensor) -> bool:
    """Triton's interpreter (CPU) gets tl.dot wrong on bfloat16 inputs: there the dot runs in float32.

    The compiled GPU kernels never take this branch."""
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number exercises split-K


def choose_config(m: int, n: int, k: int, device: torch.device) -> LaunchConfig:
    """Decode shapes stream the weight with split-K; prefill shapes use larger tiles and no split."""
    if m <= 64:
        block_m, block_n, block_k = (16, 64, 128) if m <= 16 else (64, 64, 64)
        tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
        split = max(1, min(2 * _num_sms(device) // tiles, triton.cdiv(k, block_k), 16))
        return LaunchConfig(block_m, block_n, block_k, split, num_warps=4, num_stages=4)
    return LaunchConfig(64, 128, 64, 1, num_warps=4, num_stages=3)


def _prepare(x: torch.Tensor, n: int, k: int, config: LaunchConfig | None):
    """Flatten x, pick the launch config and allocate the output (float32 when split-K accumulates)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"A16 kernels take float16 or bfloat16 activations, got {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the weight expects {k}")
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    cfg = config or choose_config(m, n, k, x.device)
    if cfg.split_k > 1:
        y = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    elif _dot_f32(x):  # the interpreter also truncates float32 -> bfloat16 stores: let torch round
        y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m), triton.cdiv(n, cfg.block_n), cfg.split_k)
    return x2, y, cfg, grid


def w4a16_matmul(x: torch.Tensor, w: Int4Weight, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16) @ W^T -> [..., N] in x.dtype."""
    k, n = w.in_features, w.out_features
    x2, y, cfg, grid = _prepare(x, n, k, config)
    _w4a16_kernel[grid](
        x2, w.qweight, w.scales, w.biases, y, x2.shape[0], n, k, w.group_size,
        x2.stride(0), w.qweight.stride(0), w.scales.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        DOT_F32=_dot_f32(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def w8a16_matmul(x: torch.Tensor, w: Int8Weight, config: LaunchConfig | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16) @ W^T -> [..., N] in x.dtype."""
    k, n = w.in_features, w.out_features
    x2, y, cfg, grid = _prepare(x, n, k, config)
    _w8a16_kernel[grid](
        x2, w.qweight, w.scales, y, x2.shape[0], n, k, w.group_size,
        x2.stride(0), w.qweight.stride(0), w.scales.stride(0), y.stride(0),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=cfg.split_k,
        DOT_F32=_dot_f32(x), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
