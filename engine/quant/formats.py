"""Converters from on-disk quantized formats into Int4Weight / Int8Weight (load time, no dense copy).

Each converter takes the tensors exactly as the producer wrote them:
- AWQ (AutoAWQ GEMM): qweight int32 [K, N // 8] with eight codes per int32 in AWQ's interleaved order
  (bits 4i..4i+3 hold column 8c + AWQ_ORDER[i]), qzeros int32 [K // G, N // 8] packed the same way,
  scales [K // G, N]; w = (q - z) * s.
- GPTQ (desc_act false): qweight int32 [K // 8, N] packed along K in order (our layout), qzeros int32
  [K // G, N // 8] packed along N in order, scales [K // G, N], g_idx [K]. The historical "gptq" (v1)
  checkpoints store zero - 1, so z = stored + 1 (no wrap, as AutoGPTQ / transformers dequantize);
  "gptq_v2" stores z itself.
- FP8 (or int8) weight-only: float8_e4m3fn / int8 weight [N, K] and weight_scale (per tensor: [] / [1]; per channel:
  [N] / [N, 1]; or block-wise weight_scale_inv [ceil(N / bn), ceil(K / bk)]); w = q * scale.
- GGUF Q4_0 / Q4_1 / Q8_0 / Q4_K / Q6_K from the raw block bytes ([N, bytes per row] uint8, as
  gguf.GGUFReader gives them).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.quant.weights import PACK, Int4Weight, Int8Weight, pack_int4

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column offset held by nibble i of an AWQ int32


def _unpack_cols(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(PACK))) -> torch.Tensor:
    """int32 [R, C] with eight codes per int32 along the columns -> int32 [R, 8C] (nibble i -> column order[i])."""
    rows, cols = packed.shape
    out = torch.empty(rows, cols, PACK, dtype=torch.int32, device=packed.device)
    for i, col in enumerate(order):
        out[:, :, col] = (packed >> (4 * i)) & 0xF
    return out.view(rows, cols * PACK)


def _group_size(group_size: int, k: int) -> int:
    return k if group_size in (-1, 0, None) else int(group_size)


def _check_packed_int4(
    fmt: str, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, groups: int, n: int, group_size: int
) -> None:
    """AWQ and GPTQ share the int32 packing of weights and zeros and the [groups, N] scales."""
    if (
        qweight.dtype != torch.int32
        or tuple(qzeros.shape) != (groups, n // PACK)
        or tuple(scales.shape) != (groups, n)
    ):
        raise ValueError(
            f"{fmt} tensors do not fit: qweight {tuple(qweight.shape)} {qweight.dtype}, qzeros {tuple(qzeros.shape)}, "
            f"scales {tuple(scales.shape)}, group size {group_size}"
        )


def from_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> Int4Weight:
    k, n = qweight.shape[0], qweight.shape[1] * PACK
    group_size = _group_size(group_size, k)
    groups = k // group_size
    _check_packed_int4("AWQ", qweight, qzeros, scales, groups, n, group_size)
    codes = _unpack_cols(qweight, AWQ_ORDER)
    zeros = _unpack_cols(qzeros, AWQ_ORDER)
    return Int4Weight(pack_int4(codes), scales.contiguous(), _biases(zeros, scales), group_size)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int,
    *,
    zero_offset: int = 1,
) -> Int4Weight:
    """zero_offset=1 for "gptq" (v1) checkpoints, 0 for "gptq_v2"."""
    k, n = qweight.shape[0] * PACK, qweight.shape[1]
    group_size = _group_size(group_size, k)
    groups = k // group_size
    _check_packed_int4("GPTQ", qweight, qzeros, scales, groups, n, group_size)
    if g_idx is not None:
        expected = torch.arange(k, device=g_idx.device) // group_size
        if not torch.equal(g_idx.to(torch.int64), expected):
            raise ValueError(
                "g_idx is not k // group_size (act-order / desc_act checkpoints are not supported)"
            )
    zeros = _unpack_cols(qzeros) + zero_offset
    return Int4Weight(qweight.contiguous(), scales.contiguous(), _biases(zeros, scales), group_size)


def _biases(zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-zero * scale, kept in float32: exact for a 16-bit scale, and only one value per group."""
    return (-zeros.to(torch.float32) * scales.to(torch.float32)).contiguous()


def from_8bit(
    weight: torch.Tensor, weight_scale: torch.Tensor, block_size: tuple[int, int] | None = None
) -> Int8Weight:
    """float8_e4m3fn (FP8) or int8 weight [N, K]; weight_scale per tensor, per channel, or (with
    block_size) block-wise [ceil(N/bn), ceil(K/bk)]."""
    if weight.dtype not in (torch.float8_e4m3fn, torch.int8) or weight.dim() != 2:
        raise ValueError(
            f"8-bit weight must be 2-D float8_e4m3fn or int8, got {weight.dtype} {tuple(weight.shape)}"
        )
    n, k = weight.shape
    scale = weight_scale.to(torch.float32)
    if block_size is not None:
        bn, bk = block_size
        if k % bk or scale.shape != ((n + bn - 1) // bn, k // bk):
            raise ValueError(
                f"block scales {tuple(scale.shape)} do not fit weight {(n, k)} with blocks {block_size}"
            )
        return Int8Weight(weight.contiguous(), scale.repeat_interleave(bn, 0)[:n].contiguous(), bk)
    if scale.numel() == 1:
        scale = scale.reshape(1, 1).expand(n, 1)
    elif scale.numel() == n:
        scale = scale.reshape(n, 1)
    else:
        raise ValueError(
            f"weight_scale of shape {tuple(weight_scale.shape)} is neither per-tensor nor per-channel"
        )
    return Int8Weight(weight.contiguous(), scale.contiguous(), k)


# ---- GGUF ------------------------------------------------------------------------------------------

GGUF_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")


def _blocks(raw: torch.Tensor | np.ndarray, n: int, k: int, block: int, nbytes: int) -> torch.Tensor:
    raw = torch.as_tensor(np.ascontiguousarray(raw)) if isinstance(raw, np.ndarray) else raw
    if raw.dtype != torch.uint8 or raw.numel() != n * (k // block) * nbytes or k % block:
        raise ValueError(f"raw GGUF data of {raw.numel()} bytes does not hold a [{n}, {k}] tensor")
    return raw.reshape(n, k // block, nbytes)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian bytes -> float16 [...]."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return torch.cat([qs & 0xF, qs >> 4], -1)


def from_gguf(raw: torch.Tensor | np.ndarray, qtype: str, shape: tuple[int, int]) -> Int4Weight | Int8Weight:
    """Raw GGUF blocks of a [N, K] (HF orientation: out, in) tensor -> our representation."""
    n, k = shape
    if qtype == "Q4_0":
        b = _blocks(raw, n, k, 32, 18)
        d = _f16(b[..., :2])  # [N, K/32]
        codes = _nibbles(b[..., 2:]).reshape(n, k)
        return Int4Weight(pack_int4(codes.T), d.T.contiguous(), (d.T * -8).contiguous(), 32)
    if qtype == "Q4_1":
        b = _blocks(raw, n, k, 32, 20)
        d, m = _f16(b[..., :2]), _f16(b[..., 2:4])
        codes = _nibbles(b[..., 4:]).reshape(n, k)
        return Int4Weight(pack_int4(codes.T), d.T.contiguous(), m.T.contiguous(), 32)
    if qtype == "Q8_0":
        b = _blocks(raw, n, k, 32, 34)
        d = _f16(b[..., :2])
        codes = b[..., 2:].contiguous().view(torch.int8).reshape(n, k)
        return Int8Weight(codes, d.contiguous(), 32)
    if qtype == "Q4_K":
        b = _blocks(raw, n, k, 256, 144)
        d, dmin = _f16(b[..., :2]).float(), _f16(b[..., 2:4]).float()
        sc, mn = _q4k_scale_min(b[..., 4:16].to(torch.int32))  # [N, K/256, 8]
        qs = b[..., 16:].reshape(n, k // 256, 4, 32)  # four 64-element chunks: low nibbles, then high
        codes = torch.stack([qs & 0xF, qs >> 4], 3).reshape(n, k)
        scales = (d.unsqueeze(-1) * sc).reshape(n, k // 32).to(torch.float16)
        biases = (-(dmin.unsqueeze(-1) * mn)).reshape(n, k // 32).to(torch.float16)
        return Int4Weight(pack_int4(codes.T), scales.T.contiguous(), biases.T.contiguous(), 32)
    if qtype == "Q6_K":
        b = _blocks(raw, n, k, 256, 210)
        ql = b[..., :128].reshape(n, k // 256, 2, 64).to(torch.int32)
        qh = b[..., 128:192].reshape(n, k // 256, 2, 32).to(torch.int32)
        sc = b[..., 192:208].contiguous().view(torch.int8).float()  # [N, K/256, 16]
        d = _f16(b[..., 208:210]).float()
        low = torch.cat([ql & 0xF, ql >> 4], -1)  # [.., 2, 128]: elements 0..31, 32..63 | 64..95, 96..127
        high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], -1)  # same element order
        codes = (low | (high << 4)) - 32
        scales = (d.unsqueeze(-1) * sc).reshape(n, k // 16).to(torch.float16)
        return Int8Weight(codes.reshape(n, k).to(torch.int8), scales.contiguous(), 16)
    raise ValueError(
        f"GGUF type {qtype} is not supported by the quantized kernels (supported: {', '.join(GGUF_TYPES)})"
    )


def _q4k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K super-block -> eight 6-bit scales and eight 6-bit mins."""
    lo_sc, lo_mn, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0xF) | ((lo_sc >> 6) << 4)], -1)
    mn = torch.cat([lo_mn & 63, (hi >> 4) | ((lo_mn >> 6) << 4)], -1)
    return sc.float(), mn.float()
