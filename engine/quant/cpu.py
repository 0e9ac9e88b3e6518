"""CPU matmuls against quantized weights.

`int4_matmul` / `int8_matmul`: the exact path (float32). The weight is dequantized one K tile at a time
(about TILE_ELEMENTS values, sized to stay in cache) and accumulated with addmm into a float32 output, so
no dense copy of the weight ever exists.

`AtenInt4`: the fast path for bfloat16 models. ATen's CPU int4 GEMM (`_weight_int4pack_mm_for_cpu`,
vectorized for bfloat16 activations) reads the 4-bit codes directly; it computes in bfloat16 precision,
which is the precision a bfloat16 model asked for. It holds the same bits: ATen's own packing of the codes
(4 bits each) plus bfloat16 (scale, zero) pairs per group.
"""

from __future__ import annotations

import threading

import torch

from engine.quant.weights import PACK, Int4Weight, Int8Weight, unpack_int4_t

TILE_ELEMENTS = 1 << 18  # floats per tile (1 MiB): fewer, larger ops; per-op overhead dominated smaller tiles


def _tile_rows(n: int, group_size: int, k: int) -> int:
    rows = max(group_size, (TILE_ELEMENTS // max(n, 1)) // group_size * group_size)
    return min(rows, k)


def _scratch(name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reused per-thread buffer: fresh multi-megabyte tensors cost page faults on every call, more than
    the math does."""
    buffers = _SCRATCH.__dict__
    buf = buffers.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = buffers[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


_SCRATCH = threading.local()


def int4_matmul(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [M, K] @ W^T -> float32 [M, N].

    Per tile: the packed int32 rows are read as bytes [N, k / 2] whose low nibbles are the even rows of K
    and high nibbles the odd ones, so each half meets x's even / odd columns in its own addmm (no
    interleaving pass). The per-group biases contribute sum_g (sum of x over group g) * bias_g: one small
    matmul for all of K. All tile buffers are reused (see _scratch).
    """
    k, n, size = w.in_features, w.out_features, w.group_size
    x = x.to(torch.float32)
    m = x.shape[0]
    out = x.view(m, k // size, size).sum(-1) @ w.biases.to(torch.float32)
    step = _tile_rows(n, size, k)
    words = _scratch("int4_words", n * step // PACK, torch.int32)
    nibbles = _scratch("int4_nibbles", n * step // 2, torch.uint8)
    tile = _scratch("int4_tile", n * step // 2, torch.float32)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        g0, g1, half = k0 // size, k1 // size, (k1 - k0) // 2
        rows = words[: n * (k1 - k0) // PACK].view(n, -1)
        rows.copy_(w.qweight[k0 // PACK : k1 // PACK].T)
        packed = rows.view(-1).view(torch.uint8).view(n, g1 - g0, size // 2)
        codes = nibbles[: n * half].view(n, g1 - g0, size // 2)
        w_tile = tile[: n * half].view(n, g1 - g0, size // 2)
        scales = w.scales[g0:g1].T.to(torch.float32).unsqueeze(-1)  # [N, groups, 1]
        for parity in (0, 1):  # low nibbles: even rows of K; high nibbles: odd rows
            if parity == 0:
                torch.bitwise_and(packed, 0xF, out=codes)
            else:
                torch.bitwise_right_shift(packed, 4, out=codes)
            w_tile.copy_(codes).mul_(scales)
            out.addmm_(x[:, k0 + parity : k1 : 2], w_tile.view(n, half).T)
    return out


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x [M, K] @ W^T -> float32 [M, N]; codes are widened and scaled in one pass per tile."""
    k, n, size = w.in_features, w.out_features, w.group_size
    x = x.to(torch.float32)
    out = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    step = _tile_rows(n, size, k)
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        g0, g1 = k0 // size, k1 // size
        codes = w.qweight[:, k0:k1].reshape(n, g1 - g0, -1)
        if codes.dtype == torch.float8_e4m3fn:  # no mixed-dtype kernels for float8: widen first
            codes = codes.to(torch.float32)
        tile = torch.mul(codes, w.scales[:, g0:g1].to(torch.float32).unsqueeze(-1)).view(n, -1)
        out.addmm_(x[:, k0:k1], tile.T)
    return out


class AtenInt4:
    """Int4Weight repacked for ATen's CPU int4 GEMM (bfloat16 activations)."""

    GROUP_SIZES = (32, 64, 128, 256)

    def __init__(self, w: Int4Weight):
        codes = unpack_int4_t(w.qweight).to(torch.int32)  # [N, K], transient (one layer)
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
        # .to and .contiguous return x itself when it already is bfloat16 and contiguous (the decode case)
        x = x.to(torch.bfloat16).contiguous()
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scale_zero)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scale_zero": self.scale_zero}
