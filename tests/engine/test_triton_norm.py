"""The Triton RMSNorm and rotary kernels (the CUDA paths of engine/layers/norm.py and rotary.py) agree with
the PyTorch expressions."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from engine.layers.norm import RMSNorm

REPO = Path(__file__).resolve().parents[2]


def test_triton_rms_norm_and_rotary_under_the_interpreter_round_as_pytorch():
    """float32, bfloat16 and float16; sizes that are not powers of two; strided views (q_norm's input, q and
    k side by side in the fused projection); llama3 and yarn rope (bit-equal in the 16-bit types)."""
    result = subprocess.run([sys.executable, "-m", "tests.engine.norm_check"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton rms norm: ok" in result.stdout and "triton rotary: ok" in result.stdout


def test_rms_norm_off_cuda_is_the_reference_expression():
    norm = RMSNorm(8, eps=1e-6)
    x = torch.randn(3, 8)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected)
