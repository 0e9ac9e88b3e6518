"""Converters from on-disk formats into Int4Weight / Int8Weight, against each format's own definition."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from engine.quant import QuantConfig, quant_config_from_hf
from engine.quant.formats import from_8bit, from_awq, from_gguf, from_gptq
from engine.quant.weights import Int4Weight, Int8Weight, pack_int4, unpack_int4
from tests.engine.quant_helpers import awq_quantize, fp8_quantize, gptq_quantize

torch.set_num_threads(2)


def test_awq_nibble_order_known_vector():
    # Columns 0..7 of one row hold codes 1..8. AutoAWQ packs column order_map[i] into bits 4i..4i+3 with
    # order_map = [0, 2, 4, 6, 1, 3, 5, 7], so nibbles (lowest first) are 1, 3, 5, 7, 2, 4, 6, 8: 0x86427531.
    word = 0x86427531 - 2**32  # as the int32 the checkpoint stores
    qweight = torch.tensor([[word]] * 8, dtype=torch.int32)  # K = 8 rows, N = 8 columns
    qzeros = torch.tensor([[0]], dtype=torch.int32)
    scales = torch.ones(1, 8, dtype=torch.float16)
    w = from_awq(qweight, qzeros, scales, group_size=8)
    assert unpack_int4(w.qweight)[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    # and the zero point uses the same order: zeros 1..8 -> bias -1..-8
    w = from_awq(qweight, torch.tensor([[word]], dtype=torch.int32), scales, group_size=8)
    assert w.dequantize()[0].tolist() == [0.0] * 8


def test_gptq_v1_zero_point_plus_one_known_vector():
    # Symmetric 4-bit GPTQ stores zero - 1 = 7 in every nibble (0x77777777) and means zero = 8.
    qweight = torch.full((1, 8), 0x0000000F, dtype=torch.int32)  # row 0 of each column: code 15, rows 1..7: 0
    qzeros = torch.tensor([[0x77777777]], dtype=torch.int32)
    scales = torch.full((1, 8), 0.5, dtype=torch.float16)
    g_idx = torch.zeros(8, dtype=torch.int32)
    w = from_gptq(qweight, qzeros, scales, g_idx, group_size=8)
    dense = w.dequantize()  # [K, N]
    assert dense[0].tolist() == [3.5] * 8  # (15 - 8) * 0.5
    assert dense[1].tolist() == [-4.0] * 8  # (0 - 8) * 0.5
    v2 = from_gptq(qweight, qzeros, scales, g_idx, group_size=8, zero_offset=0)
    assert v2.dequantize()[1].tolist() == [-3.5] * 8  # gptq_v2 stores the zero itself


def test_pack_unpack_roundtrip_odd_n():
    codes = torch.randint(0, 16, (48, 37))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.int32))


@pytest.mark.parametrize("group_size", [32, 64, 96])
def test_awq_converter_matches_dequantized_reference(group_size):
    torch.manual_seed(1)
    weight = torch.randn(40, 192)
    tensors, reference = awq_quantize(weight, group_size)
    w = from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], group_size)
    assert (w.out_features, w.in_features) == (40, 192)
    torch.testing.assert_close(w.dequantize().T, reference, atol=1e-6, rtol=1e-6)
    assert (weight - reference).abs().max() < 0.5  # the quantizer itself is sane


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_converter_matches_dequantized_reference(group_size):
    torch.manual_seed(2)
    weight = torch.randn(24, 128)
    tensors, reference = gptq_quantize(weight, group_size)
    w = from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], group_size)
    torch.testing.assert_close(w.dequantize().T, reference, atol=1e-6, rtol=1e-6)


def test_gptq_act_order_g_idx_is_rejected():
    tensors, _ = gptq_quantize(torch.randn(8, 64), 32)
    g_idx = tensors["g_idx"].flip(0)
    with pytest.raises(ValueError, match="act-order"):
        from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx, 32)


@pytest.mark.parametrize("per_channel", [True, False])
def test_fp8_converter_matches_dequantized_reference(per_channel):
    torch.manual_seed(3)
    weight = torch.randn(33, 80)
    tensors, reference = fp8_quantize(weight, per_channel)
    w = from_8bit(tensors["weight"], tensors["weight_scale"])
    assert w.qweight.dtype == torch.float8_e4m3fn and w.scales.shape == (33, 1)
    torch.testing.assert_close(w.dequantize(), reference, atol=0, rtol=0)


def test_fp8_block_scales():
    torch.manual_seed(4)
    q = (torch.randn(200, 256) * 50).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(2, 2) + 0.5  # blocks of 128 x 128, N = 200 is not a multiple of 128
    w = from_8bit(q, scale_inv, (128, 128))
    expected = q.float() * scale_inv.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)
    torch.testing.assert_close(w.dequantize(), expected, atol=0, rtol=0)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_converter_matches_gguf_dequantize(qtype):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((24, 160)).astype(np.float32)
    gtype = gguf.GGMLQuantizationType[qtype]
    raw = gguf.quants.quantize(data, gtype)  # [N, bytes per row], the bytes a GGUF file holds
    expected = gguf.quants.dequantize(raw, gtype)
    w = from_gguf(raw, qtype, (24, 160))
    assert isinstance(w, Int8Weight if qtype == "Q8_0" else Int4Weight)
    dense = w.dequantize() if isinstance(w, Int8Weight) else w.dequantize().T
    np.testing.assert_allclose(dense.numpy(), expected, rtol=0, atol=1e-6)


def _random_kquant_blocks(rng, n, k, nbytes, d_offsets):
    raw = rng.integers(0, 256, size=(n, k // 256, nbytes), dtype=np.uint8)
    for offset in d_offsets:  # valid, modest fp16 super-block scales
        d = rng.uniform(0.001, 0.01, size=(n, k // 256)).astype(np.float16)
        raw[..., offset : offset + 2] = d.view(np.uint8).reshape(n, k // 256, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize(("qtype", "nbytes", "d_offsets"), [("Q4_K", 144, (0, 2)), ("Q6_K", 210, (208,))])
def test_gguf_kquants_match_gguf_dequantize(qtype, nbytes, d_offsets):
    rng = np.random.default_rng(6)
    raw = _random_kquant_blocks(rng, 12, 512, nbytes, d_offsets)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    w = from_gguf(raw, qtype, (12, 512))
    dense = w.dequantize() if isinstance(w, Int8Weight) else w.dequantize().T
    # Scales d * sc (and Q4_K's mins dmin * m) are stored in float16, each off by at most 2^-11 of itself:
    # Q6_K (w = q * scale) is then within 2^-11 relative; Q4_K (w = q * scale - min) within
    # (15 * 0.63 + 0.63) * 2^-11 < 6e-3 absolute here (d, dmin <= 0.01 and 6-bit sc, m <= 63).
    if qtype == "Q6_K":
        np.testing.assert_allclose(dense.numpy(), expected, rtol=2**-11, atol=1e-6)
    else:
        np.testing.assert_allclose(dense.numpy(), expected, rtol=0, atol=6e-3)


def test_gguf_unsupported_type_is_a_clear_error():
    with pytest.raises(ValueError, match="Q5_0 is not supported"):
        from_gguf(np.zeros((1, 22), np.uint8), "Q5_0", (1, 32))


def test_quantization_config_variants():
    assert quant_config_from_hf({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm"}) == (
        QuantConfig("awq", 64)
    )
    gptq = quant_config_from_hf({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False})
    assert gptq == QuantConfig("gptq", 128, zero_offset=1)
    v2 = quant_config_from_hf(
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}
    )
    assert v2.zero_offset == 0
    assert quant_config_from_hf({"quant_method": "fp8", "activation_scheme": "dynamic"}).method == "fp8"
    block = quant_config_from_hf({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert block == QuantConfig("fp8_block", block_size=(128, 128))
    assert quant_config_from_hf({"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0}).method == "fp8"
    ct = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            }
        },
        "ignore": ["lm_head"],
    }
    assert quant_config_from_hf(ct).method == "fp8"
    with pytest.raises(ValueError, match="desc_act"):
        quant_config_from_hf({"quant_method": "gptq", "bits": 4, "desc_act": True})
    with pytest.raises(ValueError, match="GEMM"):
        quant_config_from_hf({"quant_method": "awq", "bits": 4, "version": "gemv"})
    with pytest.raises(ValueError, match="not supported"):
        quant_config_from_hf({"quant_method": "bitsandbytes"})
