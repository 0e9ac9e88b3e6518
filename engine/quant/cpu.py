"""CPU matmuls against quantized weights.

`int4_matmul` / `int8_matmul`: the exact path. The weight is dequantized one K tile at a time (a tile of
about TILE_ELEMENTS values, sized to stay in cache) and accumulated with addmm into a float32 output, so no
dense copy of the weight ever exists.

`AtenInt4`: the fast path for bfloat16 models. ATen's CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`,
vectorized for bfloat16 activations) reads the 4-bit codes directly; it computes in bfloat16 precision,
which is the precision a bfloat16 model asked for. It holds the same bits: ATen's own packing of the codes
(4 bits each) plus bfloat16 (scale, zero) pairs per group.
"""

from __future__ import annotations

import torch

from engine.quant.weights import Int4Weight, Int8Weight, unpack_int4

TILE_ELEMENTS = 1 << 17


def _tile_rows(n: int, group_size: int, k: int) -> int:
    rows = max(group_size, (TILE_ELEMENTS // max(n, 1)) // group_size * group_size)
    return min(rows, k)


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [M, K] @ W^T -> float32 [M, N]."""
    k, n = w.in_features, w.out_features
    x = x.to(torch.float32)
    out = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = _tile_rows(n, w.group_size, k)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        out.addmm_(x[:, k0:k1], w.dequantize(k0, k1))
    return out


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [M, K] @ W^T -> float32 [M, N]."""
    k, n = w.in_features, w.out_features
    x = x.to(torch.float32)
    out = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = _tile_rows(n, w.group_size, k)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        out.addmm_(x[:, k0:k1], w.dequantize(k0, k1).T)
    return out


class AtenInt4:
    """Int4Weight repacked for ATen's CPU int4 GEMM (bfloat16 activations)."""

    GROUP_SIZES = (32, 64, 128, 256)

    def __init__(self, w: Int4Weight):
        codes = unpack_int4(w.qweight).T.contiguous()  # [N, K] int32, transient (one layer)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        # ATen computes (q - 8) * scale + zero, so zero = bias + 8 * scale.
        scales = w.scales.to(torch.float32)
        zeros = w.biases.to(torch.float32) + 8 * scales
        self.scale_zero = torch.stack([scales, zeros], -1).to(torch.bfloat16).contiguous()
        self.group_size = w.group_size
        self.out_features = w.out_features

    @classmethod
    def supports(cls, w: Int4Weight) -> bool:
        return (
            w.qweight.device.type == "cpu"
            and w.group_size in cls.GROUP_SIZES
            and w.out_features % 16 == 0
            and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
        )

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> bfloat16 [M, N]."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scale_zero
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scale_zero": self.scale_zero}
