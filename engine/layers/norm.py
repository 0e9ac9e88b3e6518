"""RMSNorm, computed in float32 as the reference models do.

On CUDA one Triton kernel per call (engine/layers/triton_norm.py) instead of the eight elementwise and
reduction kernels of the PyTorch expression: at batch 1 a decode step is bound by kernel count as much as
by bytes, and the norms were half of a layer's kernels. Both paths round as the reference does: normalise
in float32, round to the activation dtype, multiply by the weight, round again.
"""

import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            from engine.layers.triton_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        return rms_norm_torch(x, self.weight, self.eps)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ATen's fused rms_norm does the float32 normalisation in one op (the same values as
    h * rsqrt(h.pow(2).mean(-1) + eps), pinned by tests/engine/test_layers.py): at batch 1 on the
    CPU a decode step is bound by op count, and the norms were a fifth of a layer's ops."""
    dtype = x.dtype
    h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * (h if dtype == torch.float32 else h.to(dtype))
