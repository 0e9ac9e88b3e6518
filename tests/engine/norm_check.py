"""The Triton RMSNorm under TRITON_INTERPRET=1 against the PyTorch expression; prints "triton rms norm: ok".

Run as a subprocess (`python -m tests.engine.norm_check`): the interpreter must be on before triton is
first imported.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from engine.layers.norm import rms_norm_torch  # noqa: E402
from engine.layers.triton_norm import _rms_norm_kernel, rms_norm  # noqa: E402


def main() -> None:
    assert type(_rms_norm_kernel).__name__ == "InterpretedFunction"
    torch.manual_seed(0)
    wide = torch.randn(7, 6 * 32 + 40)  # q_norm's input: a non-contiguous view of fused q/k/v rows
    cases = [
        (torch.randn(5, 64), torch.float32),
        (torch.randn(3, 576) * 4, torch.bfloat16),  # SmolLM2's hidden size: not a power of two
        (wide[:, : 6 * 32].view(7, 6, 32), torch.bfloat16),
        (torch.randn(2, 4096), torch.float16),
        (torch.randn(1, 24), torch.float32),
    ]
    for x, dtype in cases:
        x = x.to(dtype)
        weight = (torch.rand(x.shape[-1]) + 0.5).to(dtype)
        expected = rms_norm_torch(x, weight, 1e-5)
        got = rms_norm(x, weight, 1e-5)
        assert got.shape == x.shape and got.dtype == dtype, (got.shape, got.dtype)
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        else:  # at most one rounding step of the 16-bit type apart (bfloat16: 2**-7 relative)
            torch.testing.assert_close(got.float(), expected.float(), atol=1e-3, rtol=2 ** -6)
        if dtype != torch.float32:  # the same rounding as the reference: almost every element equal
            assert (got == expected).float().mean() > 0.97, (got != expected).sum()
    print("triton rms norm: ok")


if __name__ == "__main__":
    main()
