"""Our own quantizers writing the exact on-disk layouts of AWQ, GPTQ and FP8 checkpoints (tests only).

Each returns (checkpoint tensors, dequantized float weight [N, K]) for a float weight [N, K], so a test
can write the tensors into a checkpoint and give the reference model the dequantized weight. The packers
follow the formats' definitions, independent of engine/quant's unpackers.
"""

from __future__ import annotations

import torch

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of an int32 holds column 8c + AWQ_ORDER[i]


def asymmetric_int4(weight: torch.Tensor, group_size: int, min_zero: int = 0):
    """Per (row, group along K) min/max quantization -> codes [N, K], zeros and fp16 scales [N, K // G]."""
    n, k = weight.shape
    w = weight.double().reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scales = ((hi - lo) / 15).clamp(min=1e-6).half()
    s = scales.double()
    zeros = (-lo / s).round().clamp(min_zero, 15)
    codes = (w / s.unsqueeze(-1) + zeros.unsqueeze(-1)).round().clamp(0, 15)
    return codes.reshape(n, k).to(torch.int32), zeros.to(torch.int32), scales


def _to_int32(values: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit patterns -> int32 with the same bits."""
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def pack_cols(values: torch.Tensor, order: list[int]) -> torch.Tensor:
    """[R, C] codes -> int32 [R, C // 8]; nibble i (bits 4i..4i+3) holds column 8c + order[i]."""
    r, c = values.shape
    v = values.to(torch.int64).reshape(r, c // 8, 8)
    packed = torch.zeros(r, c // 8, dtype=torch.int64)
    for i, col in enumerate(order):
        packed |= v[:, :, col] << (4 * i)
    return _to_int32(packed)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] codes -> int32 [R // 8, C]; nibble j holds row 8r + j (GPTQ's qweight)."""
    r, c = values.shape
    v = values.to(torch.int64).reshape(r // 8, 8, c)
    packed = torch.zeros(r // 8, c, dtype=torch.int64)
    for j in range(8):
        packed |= v[:, j, :] << (4 * j)
    return _to_int32(packed)


def awq_quantize(weight: torch.Tensor, group_size: int):
    """AutoAWQ GEMM layout: qweight [K, N // 8], qzeros [K // G, N // 8], scales fp16 [K // G, N]."""
    codes, zeros, scales = asymmetric_int4(weight, group_size)
    tensors = {
        "qweight": pack_cols(codes.T, AWQ_ORDER),
        "qzeros": pack_cols(zeros.T, AWQ_ORDER),
        "scales": scales.T.contiguous(),
    }
    return tensors, _dequant(codes, zeros, scales, group_size)


def gptq_quantize(weight: torch.Tensor, group_size: int):
    """GPTQ v1 layout: qweight [K // 8, N], qzeros [K // G, N // 8] holding zero - 1, scales, g_idx."""
    codes, zeros, scales = asymmetric_int4(weight, group_size, min_zero=1)  # v1 cannot store zero 0
    k = weight.shape[1]
    tensors = {
        "qweight": pack_rows(codes.T),
        "qzeros": pack_cols(zeros.T - 1, list(range(8))),
        "scales": scales.T.contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32) // group_size,
    }
    return tensors, _dequant(codes, zeros, scales, group_size)


def fp8_quantize(weight: torch.Tensor, per_channel: bool):
    """float8_e4m3fn weight with weight_scale [N, 1] (per channel) or [] (per tensor)."""
    amax = weight.abs().amax(-1, keepdim=True) if per_channel else weight.abs().amax()
    scale = (amax.float() / 448.0).clamp(min=1e-12)
    q = (weight.float() / scale).to(torch.float8_e4m3fn)
    return {"weight": q, "weight_scale": scale}, q.float() * scale


def _dequant(codes, zeros, scales, group_size):
    n, k = codes.shape
    c = codes.double().reshape(n, k // group_size, group_size)
    w = (c - zeros.double().unsqueeze(-1)) * scales.double().unsqueeze(-1)
    return w.reshape(n, k).float()
