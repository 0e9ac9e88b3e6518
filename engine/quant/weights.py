"""The two in-memory quantized weight representations every source format converts into.

Int4Weight (W4A16): int4 codes packed eight per int32 along K, GPTQ's layout `qweight[K // 8, N]` with
nibble j of `qweight[r, n]` holding the code of row k = 8r + j (contiguous along N, which is what the
Triton kernel loads). Per group of `group_size` rows along K: `w = q * scale + bias`. A float `bias` (not
an integer zero point) is what lets one representation hold AWQ/GPTQ (`bias = -zero * scale`), GGUF Q4_0
(`bias = -8 * d`), Q4_1 (`bias = min`) and Q4_K (`bias = -dmin * m`) exactly.

Int8Weight (W8A16): int8 or float8_e4m3fn codes in the checkpoints' own `[N, K]` layout, `w = q * scale`
with `scales[N, K // group_size]` (group_size == K is per-channel; per-tensor scales are broadcast to
per-channel at load, N floats).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PACK = 8  # int4 codes per int32


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[K, N] integer codes in 0..15 -> int32 [K // 8, N] (row k = 8r + j in bits 4j..4j+3 of row r).

    Built byte-wise (two codes per byte, four bytes per little-endian int32): integer shifts over a
    strided int32 tensor are an order of magnitude slower in torch."""
    k, n = codes.shape
    if k % PACK:
        raise ValueError(f"K={k} is not a multiple of {PACK}")
    pairs = codes.T.to(torch.uint8).reshape(n, k // PACK, 4, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous().view(-1).view(torch.int32)
    return packed.view(n, k // PACK).T.contiguous()


def unpack_int4_t(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, N] -> uint8 codes [N, 8R]: W^T's rows as W's rows (the layout the CPU tiles use)."""
    rows, n = packed.shape
    b = packed.T.contiguous().view(-1).view(torch.uint8).view(n, rows, 4)
    return torch.stack([b & 0xF, b >> 4], -1).view(n, rows * PACK)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [K // 8, N] -> int32 codes [K, N] in 0..15 (inverse of pack_int4)."""
    return unpack_int4_t(packed).T.to(torch.int32)


@dataclass
class Int4Weight:
    qweight: torch.Tensor  # int32 [K // 8, N]
    scales: torch.Tensor  # float16/bfloat16/float32 [K // group_size, N]
    biases: torch.Tensor  # float [K // group_size, N] (float32 for AWQ/GPTQ: -zero * scale exactly)
    group_size: int

    def __post_init__(self) -> None:
        k, n = self.qweight.shape[0] * PACK, self.qweight.shape[1]
        if self.qweight.dtype != torch.int32:
            raise ValueError(f"packed int4 weight must be int32, got {self.qweight.dtype}")
        if self.group_size <= 0 or self.group_size % PACK or k % self.group_size:
            raise ValueError(f"group size {self.group_size} must be a multiple of 8 dividing K={k}")
        groups = (k // self.group_size, n)
        if tuple(self.scales.shape) != groups or tuple(self.biases.shape) != groups:
            raise ValueError(
                f"scales {tuple(self.scales.shape)} / biases {tuple(self.biases.shape)} must be {groups}"
            )

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * PACK

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(
        self, k0: int = 0, k1: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Rows k0..k1 of W^T as [k1 - k0, N] (k0, k1 multiples of group_size): the CPU tile."""
        k1 = self.in_features if k1 is None else k1
        g0, g1, size = k0 // self.group_size, k1 // self.group_size, self.group_size
        codes = unpack_int4_t(self.qweight[k0 // PACK : k1 // PACK]).to(dtype).view(-1, g1 - g0, size)
        scales = self.scales[g0:g1].T.to(dtype).unsqueeze(-1)
        biases = self.biases[g0:g1].T.to(dtype).unsqueeze(-1)
        return codes.mul_(scales).add_(biases).view(-1, k1 - k0).T  # [k, N], a view of [N, k]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "biases": self.biases}


@dataclass
class Int8Weight:
    qweight: torch.Tensor  # int8 or float8_e4m3fn [N, K]
    scales: torch.Tensor  # float [N, K // group_size]
    group_size: int

    def __post_init__(self) -> None:
        n, k = self.qweight.shape
        if self.qweight.dtype not in (torch.int8, torch.float8_e4m3fn):
            raise ValueError(f"8-bit weight must be int8 or float8_e4m3fn, got {self.qweight.dtype}")
        if self.group_size <= 0 or k % self.group_size:
            raise ValueError(f"group size {self.group_size} must divide K={k}")
        if tuple(self.scales.shape) != (n, k // self.group_size):
            raise ValueError(f"scales {tuple(self.scales.shape)} must be {(n, k // self.group_size)}")

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(
        self, k0: int = 0, k1: int | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Columns k0..k1 of W as [N, k1 - k0] (k0, k1 multiples of group_size)."""
        k1 = self.in_features if k1 is None else k1
        g0, g1, size = k0 // self.group_size, k1 // self.group_size, self.group_size
        codes = self.qweight[:, k0:k1].to(dtype).view(-1, g1 - g0, size)
        return (codes * self.scales[:, g0:g1].to(dtype).unsqueeze(-1)).view(-1, k1 - k0)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}


QuantWeight = Int4Weight | Int8Weight


def concat_out(parts: list[QuantWeight]) -> QuantWeight:
    """Fuse same-kind weights along N (q/k/v -> qkv); ValueError when they cannot share one kernel."""
    first = parts[0]
    if len(parts) == 1:
        return first
    same = all(
        type(p) is type(first)
        and p.group_size == first.group_size
        and p.in_features == first.in_features
        and p.qweight.dtype == first.qweight.dtype
        and p.scales.dtype == first.scales.dtype
        and getattr(p, "biases", p.scales).dtype == getattr(first, "biases", first.scales).dtype
        for p in parts
    )
    if not same:
        raise ValueError("parts differ in kind, group size or dtype")
    if isinstance(first, Int4Weight):
        return Int4Weight(
            torch.cat([p.qweight for p in parts], 1),
            torch.cat([p.scales for p in parts], 1),
            torch.cat([p.biases for p in parts], 1),
            first.group_size,
        )
    return Int8Weight(
        torch.cat([p.qweight for p in parts], 0), torch.cat([p.scales for p in parts], 0), first.group_size
    )
