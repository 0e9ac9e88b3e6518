"""`python -m engine serve` without --dtype picks the hardware's fast mode; --dtype float32 is the exact one."""

import pytest
import torch

from engine.__main__ import build_parser, serve_dtype

BF16_CPU = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def args(*extra: str):
    return build_parser().parse_args(["serve", "--model", "m.gguf", "--device", "cpu", *extra])


@pytest.mark.skipif(not BF16_CPU, reason="this CPU has no native bfloat16: float32 is its fast mode too")
def test_a_decoder_is_served_in_bfloat16_on_a_cpu_with_native_bfloat16():
    assert serve_dtype(args(), encoder=False) == torch.bfloat16


@pytest.mark.skipif(BF16_CPU, reason="this CPU has native bfloat16")
def test_a_decoder_is_served_in_float32_on_a_cpu_without_bfloat16():
    assert serve_dtype(args(), encoder=False) == torch.float32


def test_dtype_float32_asks_for_the_exact_mode():
    assert serve_dtype(args("--dtype", "float32"), encoder=False) == torch.float32
    assert serve_dtype(args("--dtype", "float32"), encoder=True) == torch.float32


def test_an_encoder_keeps_the_loaders_float32_default():
    assert serve_dtype(args(), encoder=True) is None
    assert serve_dtype(args("--dtype", "bfloat16"), encoder=True) == torch.bfloat16
