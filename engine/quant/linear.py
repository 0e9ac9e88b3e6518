"""QuantLinear: a (possibly fused) projection whose weights stay quantized; forward picks the kernel by device.

The loader fills each logical part (q, k, v of a fused qkv...) with `load_shard(index, name, tensor)` using
the checkpoint's own tensor names; once a part has all its pieces the QuantConfig converts it into an
Int4Weight / Int8Weight (or keeps a dense float weight for a module the checkpoint left unquantized), and
once every part is in, same-kind parts are concatenated along N so one kernel call serves the fused
projection.

Kernels: CUDA -> Triton W4A16 / W8A16; CPU -> the exact tile-by-tile path, or ATen's int4 GEMM when the
model computes in bfloat16 (same precision, several times faster for decode).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from engine.quant import cpu
from engine.quant.weights import Int4Weight, Int8Weight, QuantWeight, concat_out

if TYPE_CHECKING:
    from engine.quant.config import QuantConfig

Part = QuantWeight | torch.Tensor  # a dense float weight [n, K] for parts left unquantized


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as packed int4 / 8-bit codes plus scales."""

    def __init__(
        self,
        in_features: int,
        output_sizes: Sequence[int],
        bias: bool,
        dtype: torch.dtype | None,
        config: QuantConfig,
    ):
        super().__init__()
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.offsets = [0]
        for size in self.output_sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.dtype = dtype or torch.get_default_dtype()
        self.config = config
        self.target_device = torch.empty(0).device  # honours `with torch.device(...)` at model build
        self.bias = _frozen(torch.zeros(self.offsets[-1], dtype=self.dtype)) if bias else None
        self._pieces: dict[int, dict[str, object]] = {}
        self._parts: list[Part | None] = [None] * len(self.output_sizes)
        self._kernels: list[tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = []
        self.kernel_names: list[str] = []

    @torch.no_grad()
    def load_shard(self, index: int, param_name: str, tensor) -> None:
        """Take one checkpoint tensor of logical part `index`; ValueError on a bad name or shape."""
        start, end = self.offsets[index], self.offsets[index + 1]
        if param_name == "bias":
            if self.bias is None or tuple(tensor.shape) != (end - start,):
                raise ValueError(f"unexpected bias of shape {tuple(tensor.shape)} for this projection")
            self.bias[start:end].copy_(tensor)
            return
        if self._parts[index] is not None:
            if param_name in self.config.ignored_names:
                return
            raise ValueError(f"parameter {param_name!r} given twice")
        pieces = self._pieces.setdefault(index, {})
        pieces[param_name] = tensor
        part = self.config.convert(pieces)
        if part is None:
            return
        del self._pieces[index]
        shape = (
            (part.out_features, part.in_features) if not isinstance(part, torch.Tensor) else tuple(part.shape)
        )
        if shape != (end - start, self.in_features):
            raise ValueError(f"quantized weight holds {shape}, expected {(end - start, self.in_features)}")
        if isinstance(part, torch.Tensor):
            part = part.to(self.target_device, self.dtype)
        else:
            part = type(part)(**{name: t.to(self.target_device) for name, t in part.tensors().items()},
                              group_size=part.group_size)  # fmt: skip
        self._parts[index] = part
        if all(p is not None for p in self._parts):
            self._build_kernels()

    def _build_kernels(self) -> None:
        """Fuse runs of compatible parts and bind each run to its kernel; what stays resident is registered
        as (frozen) parameters, which is what the loader counts as weight bytes."""
        runs: list[list[int]] = []
        for i, part in enumerate(self._parts):
            if runs and _fusable(self._parts[runs[-1][0]], part):
                runs[-1].append(i)
            else:
                runs.append([i])
        for run_index, run in enumerate(runs):
            parts = [self._parts[i] for i in run]
            if isinstance(parts[0], torch.Tensor):
                weight = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
                self._kernels.append((self.offsets[run[0]], _dense_kernel(weight)))
                self.kernel_names.append("dense")
                self.register_parameter(f"run{run_index}_weight", _frozen(weight))
                continue
            weight = concat_out(parts)
            name, kernel, held = _bind(weight, self.dtype)
            self._kernels.append((self.offsets[run[0]], kernel))
            self.kernel_names.append(name)
            for tensor_name, tensor in held.items():
                self.register_parameter(f"run{run_index}_{tensor_name}", _frozen(tensor))
        self._parts = [None] * len(self._parts)  # the buffers hold them now

    def check_loaded(self) -> None:
        """ValueError naming what a checkpoint failed to provide (called by the loader after loading)."""
        if self._kernels:
            return
        missing = []
        for index, part in enumerate(self._parts):
            if part is None:
                have = set(self._pieces.get(index, {}))
                need = [n for n in self.config.weight_names if n not in have]
                missing.append(f"part {index}: {', '.join(need)}")
        raise ValueError(f"quantized projection incomplete ({'; '.join(missing)})")

    @property
    def weight_bytes(self) -> int:
        """Bytes this projection keeps resident (codes, scales, dense parts, bias)."""
        return sum(t.numel() * t.element_size() for t in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._kernels:
            raise RuntimeError("QuantLinear used before all of its weights were loaded")
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # decode's [tokens, K] as it is
        if len(self._kernels) == 1:
            y = self._kernels[0][1](flat)
        else:
            y = torch.cat([kernel(flat) for _, kernel in self._kernels], -1)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.offsets[-1])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, output_sizes={self.output_sizes}, "
            f"method={self.config.method}, kernels={self.kernel_names}"
        )


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


def _fusable(a: Part | None, b: Part | None) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    try:
        concat_out([a, b])
    except ValueError:
        return False
    return True


def _dense_kernel(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: F.linear(x.to(weight.dtype), weight)


def _bind(w: QuantWeight, dtype: torch.dtype) -> tuple[str, Callable[[torch.Tensor], torch.Tensor], dict]:
    """(kernel name, x2d -> y2d, tensors to keep resident) for this weight on its device."""
    device = w.qweight.device
    if device.type == "cuda":
        from engine.quant import triton_kernels as tk

        def _a16(x: torch.Tensor) -> torch.Tensor:
            return x if x.dtype in (torch.float16, torch.bfloat16) else x.to(torch.bfloat16)

        if isinstance(w, Int4Weight):
            return "triton_w4a16", lambda x: tk.w4a16_matmul(_a16(x), w), w.tensors()
        return "triton_w8a16", lambda x: tk.w8a16_matmul(_a16(x), w), w.tensors()
    if isinstance(w, Int4Weight):
        if dtype == torch.bfloat16 and cpu.AtenInt4.supports(w):
            aten = cpu.AtenInt4(w)
            return "aten_int4_cpu", aten.matmul, aten.tensors()
        return "cpu_tiled_w4", lambda x: cpu.int4_matmul(x, w), w.tensors()
    assert isinstance(w, Int8Weight)
    return "cpu_tiled_w8", lambda x: cpu.int8_matmul(x, w), w.tensors()
