"""W4A16 / W8A16 kernels (CPU tiles, ATen int4, Triton under the interpreter) against float64 references."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.quant import QuantConfig, cpu
from engine.quant.weights import Int4Weight, Int8Weight, pack_int4
from tests.engine.quant_helpers import awq_quantize

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[2]


def random_int4(k: int, n: int, group_size: int, seed: int = 0) -> Int4Weight:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=g)
    scales = (torch.rand(k // group_size, n, generator=g) * 0.1 + 0.01).half()
    biases = (torch.randn(k // group_size, n, generator=g) * 0.3).half()
    return Int4Weight(pack_int4(codes), scales, biases, group_size)


def random_int8(n: int, k: int, group_size: int, dtype: torch.dtype, seed: int = 0) -> Int8Weight:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.int8:
        codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    else:
        codes = (torch.randn(n, k, generator=g) * 40).to(torch.float8_e4m3fn)
    return Int8Weight(codes, torch.rand(n, k // group_size, generator=g) * 0.02 + 0.001, group_size)


def rel_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


SHAPES = [(1, 96, 37, 32), (5, 160, 101, 32), (64, 288, 72, 96), (257, 192, 45, 64)]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few groups, so every multiply runs the K loop several times."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 2048)


@pytest.mark.parametrize(("m", "k", "n", "group_size"), SHAPES)
def test_cpu_int4_tiles_match_float64(small_tiles, m, k, n, group_size):
    w = random_int4(k, n, group_size)
    x = torch.randn(m, k)
    assert cpu._tile_rows(n, group_size, k) < k
    reference = x.double() @ w.dequantize(dtype=torch.float64)
    y = cpu.int4_matmul(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert rel_error(y, reference) < 1e-5


@pytest.mark.parametrize(("m", "k", "n", "group_size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_cpu_int8_tiles_match_float64(small_tiles, m, k, n, group_size, dtype):
    w = random_int8(n, k, group_size, dtype)
    x = torch.randn(m, k)
    reference = x.double() @ w.dequantize(dtype=torch.float64).T
    assert rel_error(cpu.int8_matmul(x, w), reference) < 1e-5


@pytest.mark.parametrize(
    ("m", "k", "n", "group_size"), [(1, 96, 48, 32), (7, 192, 112, 64), (130, 256, 32, 128)]
)
def test_aten_int4_cpu_matches_float64_within_bfloat16(m, k, n, group_size):
    w = random_int4(k, n, group_size)
    if not cpu.AtenInt4.supports(w):
        pytest.skip("this torch has no CPU int4 GEMM")
    x = torch.randn(m, k).bfloat16()
    reference = x.double() @ w.dequantize(dtype=torch.float64)
    y = cpu.AtenInt4(w).matmul(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    # bfloat16 scales and output: a few bfloat16 ulps of the largest output
    assert rel_error(y, reference) < 2e-2


def test_triton_kernels_under_interpreter_match_float64():
    out = subprocess.run(
        [sys.executable, "-m", "tests.engine.quant_triton_check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert results["interpreted"] == "InterpretedFunction"  # the kernel really ran, in the interpreter
    cases = results["cases"]
    assert {c["kernel"] for c in cases} == {"w4a16", "w8a16-int8", "w8a16-float8_e4m3fn"}
    assert max(c["m"] for c in cases) >= 200 and min(c["m"] for c in cases) == 1
    for case in cases:
        assert case["shape_ok"], case
        # one rounding of the output to the activation dtype: 2^-11 (fp16), 2^-8 (bf16) of the largest value
        limit = 1e-3 if case["dtype"] == "float16" else 4e-3
        assert case["error"] < limit, case


# ---- QuantLinear -------------------------------------------------------------------------------------


def _awq_linear(output_sizes, k, dtype, group_size=32, bias=False):
    """A fused QuantLinear loaded shard by shard from AWQ tensors, and the dequantized dense weight."""
    linear = QuantConfig("awq", group_size).create_linear(k, output_sizes, bias, dtype)
    dense = []
    for index, n in enumerate(output_sizes):
        tensors, deq = awq_quantize(torch.randn(n, k), group_size)
        for name in ("scales", "qzeros", "qweight"):  # any order
            linear.load_shard(index, name, tensors[name])
        dense.append(deq)
    return linear, torch.cat(dense)


def test_quant_linear_fused_awq_matches_dense_float32():
    torch.manual_seed(7)
    linear, dense = _awq_linear([64, 32, 32], 96, torch.float32, bias=True)
    bias = torch.randn(128)
    for index, (start, end) in enumerate([(0, 64), (64, 96), (96, 128)]):
        linear.load_shard(index, "bias", bias[start:end])
    assert linear.kernel_names == ["cpu_tiled_w4"]  # three shards, one kernel call
    x = torch.randn(3, 5, 96)
    y = linear(x)
    assert y.shape == (3, 5, 128) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ dense.T + bias, atol=1e-4, rtol=1e-4)


def test_quant_linear_bfloat16_uses_aten_int4():
    torch.manual_seed(8)
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 GEMM")
    linear, dense = _awq_linear([48, 32], 64, torch.bfloat16)
    assert linear.kernel_names == ["aten_int4_cpu"]
    odd, _ = _awq_linear([40], 64, torch.bfloat16)  # ATen needs N % 16 == 0: the tiles take it
    assert odd.kernel_names == ["cpu_tiled_w4"]
    x = torch.randn(4, 64).bfloat16()
    y = linear(x)
    assert y.dtype == torch.bfloat16
    reference = x.double() @ dense.double().T
    assert rel_error(y, reference) < 2e-2


def test_quant_linear_weight_bytes_is_the_packed_size():
    linear, _ = _awq_linear([128, 64], 256, torch.float32, group_size=128)
    k, n = 256, 192
    packed = k * n // 2 + (k // 128) * n * (2 + 4)  # int4 codes + fp16 scales + fp32 biases
    assert linear.weight_bytes == packed
    assert linear.weight_bytes < 0.15 * k * n * 4  # vs float32 dense


def test_quant_linear_mixed_parts_run_separately():
    """A part the checkpoint left in float (modules_to_not_convert) sits next to quantized parts."""
    torch.manual_seed(9)
    linear = QuantConfig("awq", 32).create_linear(64, [32, 16], False, torch.float32)
    tensors, deq = awq_quantize(torch.randn(32, 64), 32)
    for name, tensor in tensors.items():
        linear.load_shard(0, name, tensor)
    plain = torch.randn(16, 64)
    linear.load_shard(1, "weight", plain)
    assert linear.kernel_names == ["cpu_tiled_w4", "dense"]
    x = torch.randn(2, 64)
    torch.testing.assert_close(linear(x), x @ torch.cat([deq, plain]).T, atol=1e-4, rtol=1e-4)


def test_quant_linear_rejects_bad_shapes_and_names():
    linear = QuantConfig("awq", 32).create_linear(64, [32], False, torch.float32)
    tensors, _ = awq_quantize(torch.randn(40, 64), 32)  # 40 outputs where 32 are expected
    with pytest.raises(ValueError, match="unexpected tensor"):
        linear.load_shard(0, "g_idx", torch.zeros(64))
    linear = QuantConfig("awq", 32).create_linear(64, [32], False, torch.float32)
    linear.load_shard(0, "qweight", tensors["qweight"])
    linear.load_shard(0, "qzeros", tensors["qzeros"])
    with pytest.raises(ValueError, match="expected"):
        linear.load_shard(0, "scales", tensors["scales"])
    with pytest.raises(RuntimeError, match="before all of its weights"):
        linear(torch.randn(1, 64))


def test_quant_linear_decode_fast_path_equals_the_general_path():
    """A 2-D input through one fused kernel skips the reshape / concatenation; the values must not move."""
    torch.manual_seed(9)
    for dtype in (torch.float32, torch.bfloat16):
        linear, _ = _awq_linear([48, 32], 64, dtype)
        x = torch.randn(1, 64).to(dtype)
        fast, general = linear(x), linear(x[None])[0]
        assert fast.dtype == dtype and fast.shape == (1, 80)
        assert torch.equal(fast, general)
