"""The one place projections are created, so quantized linears can replace them without touching models.

A projection may fuse several logical HF projections along the output dimension (q/k/v -> qkv, gate/up ->
gate_up): one matmul instead of three or two. The model calls `make_linear(in, [out1, out2, ...], bias,
quant=...)`; the loader fills each logical part with `module.load_shard(index, "weight" | "bias", tensor)` (a quantized
module may accept other parameter names, e.g. packed weights and scales).

Quantization hook: `quant` is any object with
`create_linear(in_features, output_sizes, bias, dtype) -> nn.Module`; the module it returns must offer the
same `load_shard(index, param_name, tensor)` and `forward(x) -> [.., sum(output_sizes)]` as `Linear`
(engine/quant/ implements it; with quant=None the model gets plain dense weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F


class QuantSpec(Protocol):
    def create_linear(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype | None
    ) -> nn.Module: ...


class Linear(nn.Module):
    """Dense y = x W^T + b, weight [sum(output_sizes), in_features]."""

    def __init__(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.offsets = [0]
        for size in self.output_sizes:
            self.offsets.append(self.offsets[-1] + size)
        out_features = self.offsets[-1]
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        )

    @torch.no_grad()
    def load_shard(self, index: int, param_name: str, tensor: torch.Tensor) -> None:
        """Copy logical projection `index`'s "weight" or "bias" in; ValueError on a bad shape or name."""
        start, end = self.offsets[index], self.offsets[index + 1]
        if param_name == "weight":
            target, expected = self.weight, (end - start, self.in_features)
        elif param_name == "bias" and self.bias is not None:
            target, expected = self.bias, (end - start,)
        else:
            raise ValueError(f"unexpected parameter {param_name!r} for this projection")
        if tuple(tensor.shape) != expected:
            raise ValueError(f"bad shape {tuple(tensor.shape)}, expected {expected}")
        target[start:end].copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, output_sizes={self.output_sizes}, bias={self.bias is not None}"
        )


def make_linear(
    in_features: int,
    output_sizes: int | Sequence[int],
    bias: bool = False,
    *,
    quant: QuantSpec | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Create a (possibly fused, possibly quantized) projection."""
    sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
    if quant is not None:
        return quant.create_linear(in_features, sizes, bias, dtype)
    return Linear(in_features, sizes, bias, dtype)
