"""Layers against transformers: rotary scaling variants, RMSNorm; the linear factory's quantization hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.layers.linear import Linear, make_linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import compute_inv_freq
from engine.loader import load_model
from tests.engine.checkpoints import tiny_checkpoint
from tests.engine.paged_driver import PagedDriver

torch.set_num_threads(2)

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 1000000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    },
}


@pytest.mark.parametrize("rope_type", sorted(ROPES))
def test_rotary_frequencies_match_transformers(rope_type):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = ROPES[rope_type]
    config = LlamaConfig(
        hidden_size=512, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=dict(params)
    )
    if rope_type == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, expected_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(config), 1.0
        if isinstance(expected, tuple):
            expected, expected_scale = expected
    else:
        expected, expected_scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    inv_freq, scale = compute_inv_freq(128, dict(params), 131072)
    torch.testing.assert_close(inv_freq, expected.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(expected_scale)


def test_dynamic_rope_is_refused():
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        compute_inv_freq(64, {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 4096)


def test_rmsnorm_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(5, 64)
    ours, ref = RMSNorm(64, 1e-5), LlamaRMSNorm(64, eps=1e-5)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(ref.weight)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (37, 576), (3, 4096)])
def test_rmsnorm_cpu_equals_transformers_bit_for_bit(dtype, rows, hidden):
    """The CPU path is ATen's fused rms_norm; it must give transformers' values exactly (the float32 exact
    mode's token equality and the prefix-cache determinism tests rely on it)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(rows)
    x = (torch.randn(rows, hidden) * 3).to(dtype)
    ours, ref = RMSNorm(hidden, 1e-5, dtype), LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ours.weight.copy_(ref.weight)
        assert torch.equal(ours(x), ref(x))


def test_fused_linear_shards_and_shape_errors():
    linear = make_linear(8, [4, 2, 2], bias=True)
    parts = [torch.randn(4, 8), torch.randn(2, 8), torch.randn(2, 8)]
    biases = [torch.randn(4), torch.randn(2), torch.randn(2)]
    for i, (w, b) in enumerate(zip(parts, biases, strict=True)):
        linear.load_shard(i, "weight", w)
        linear.load_shard(i, "bias", b)
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        linear(x), torch.cat([x @ w.T + b for w, b in zip(parts, biases, strict=True)], -1)
    )
    with pytest.raises(ValueError, match=r"bad shape \(3, 8\), expected \(2, 8\)"):
        linear.load_shard(1, "weight", torch.randn(3, 8))
    with pytest.raises(ValueError, match="unexpected parameter"):
        make_linear(8, 4).load_shard(0, "bias", torch.randn(4))


class RecordingQuant:
    """A QuantSpec that records every projection it is asked for (and hands out dense ones)."""

    def __init__(self):
        self.created: list[tuple[int, list[int], bool]] = []

    def create_linear(self, in_features, output_sizes, bias, dtype) -> nn.Module:
        self.created.append((in_features, list(output_sizes), bias))
        return Linear(in_features, output_sizes, bias, dtype)


def test_every_projection_goes_through_the_quant_hook():
    quant = RecordingQuant()
    loaded = load_model(tiny_checkpoint("qwen2"), quant=quant)
    layers = loaded.spec.num_layers
    assert len(quant.created) == 4 * layers  # qkv, o, gate_up, down
    assert (64, [64, 32, 32], True) in quant.created  # fused q/k/v with bias
    assert (64, [128, 128], False) in quant.created  # fused gate/up
    reference = load_model(tiny_checkpoint("qwen2"))
    prompt = reference.tokenizer.encode("Hello, world!")
    a = PagedDriver(loaded.model, loaded.spec).greedy(prompt, 3)
    b = PagedDriver(reference.model, reference.spec).greedy(prompt, 3)
    torch.testing.assert_close(a[0], b[0])
    assert a[2] == b[2]


def test_bfloat16_model_runs_close_to_float32():
    path = tiny_checkpoint("llama")
    fp32, bf16 = load_model(path), load_model(path, dtype=torch.bfloat16)
    assert bf16.spec.dtype == torch.bfloat16 and next(bf16.model.parameters()).dtype == torch.bfloat16
    prompt = fp32.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    logits32 = PagedDriver(fp32.model, fp32.spec).greedy(prompt, 2)[0]
    logits16 = PagedDriver(bf16.model, bf16.spec).greedy(prompt, 2)[0]
    assert logits16.dtype == torch.float32
    assert (logits16 - logits32).abs().max() < 0.1 * logits32.abs().max()
