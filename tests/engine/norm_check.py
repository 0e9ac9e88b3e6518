"""The Triton RMSNorm and rotary kernels under TRITON_INTERPRET=1 against the PyTorch expressions; prints
"triton rms norm: ok" and "triton rotary: ok".

Run as a subprocess (`python -m tests.engine.norm_check`): the interpreter must be on before triton is
first imported.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from engine.layers.norm import rms_norm_torch  # noqa: E402
from engine.layers.rotary import RotaryEmbedding, apply_rotary_torch  # noqa: E402
from engine.layers.triton_norm import _rms_norm_kernel, rms_norm  # noqa: E402
from engine.layers.triton_rotary import rotary  # noqa: E402


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
    check_rotary()


def check_rotary() -> None:
    torch.manual_seed(1)
    for heads, head_dim, dtype, rope in (
        (6, 16, torch.float32, {"rope_type": "default", "rope_theta": 10000.0}),
        (6, 24, torch.bfloat16, {"rope_type": "default", "rope_theta": 10000.0}),  # half 12: padded lanes
        (20, 128, torch.bfloat16, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}),
        (3, 64, torch.float16, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                "original_max_position_embeddings": 64}),  # attention scaling != 1
    ):
        positions = torch.tensor([0, 1, 5, 77, 300])
        cos, sin = RotaryEmbedding(head_dim, rope, 512)(positions, dtype)
        fused = torch.randn(5, heads + 3, head_dim + 0).to(dtype)  # q and k side by side in a wider row
        x = fused[:, :heads]
        expected = apply_rotary_torch(x, cos, sin)
        got = rotary(x, cos, sin)
        assert got.shape == expected.shape and got.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(got, expected), (got.float() - expected.float()).abs().max()
    print("triton rotary: ok")


if __name__ == "__main__":
    main()
