"""One decoder for Llama 2/3, SmolLM2, Qwen2/2.5 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm).

Varlen forward: all sequences of a step are flattened into T tokens; attention goes through the paged KV
cache (engine/layers/attention.py). q/k/v and gate/up are fused into single projections.
Weights are named as in Hugging Face checkpoints (`load_weight(hf_name, tensor)`), whatever the file format.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from engine.distributed import TensorParallel
from engine.layers.attention import AttentionMetadata, paged_attention
from engine.layers.linear import QuantSpec
from engine.layers.norm import RMSNorm
from engine.layers.parallel import column_parallel, lm_head, row_parallel, vocab_embedding
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.support import DECODER_ARCHITECTURES as ARCHITECTURES


@dataclass
class LlamaConfig:
    """Architecture hyperparameters (the subset of HF config.json this decoder needs)."""

    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    attention_bias: bool = False  # q/k/v bias (Qwen2 always; Llama when config.attention_bias)
    qk_norm: bool = False  # Qwen3
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"


class Attention(nn.Module):
    """With tensor parallelism, this rank's heads (and KV heads) only."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None, quant: QuantSpec | None,
                 tp: TensorParallel | None = None):
        super().__init__()
        ranks = 1 if tp is None else tp.size
        if tp is not None:
            tp.shard(config.num_heads, "the number of attention heads")
            tp.shard(config.num_kv_heads, "the number of KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads // ranks,
            config.num_kv_heads // ranks,
            config.head_dim,
        )
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = column_parallel(
            config.hidden_size,
            [self.q_size * ranks, self.kv_size * ranks, self.kv_size * ranks],
            config.attention_bias,
            tp=tp,
            quant=quant,
            dtype=dtype,
        )
        self.o_proj = row_parallel(self.q_size * ranks, config.hidden_size, tp=tp, quant=quant, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype) if config.qk_norm else None

    def forward(self, x, cos, sin, kv_cache: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size :].view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            # q and k side by side: one rotary pass over [T, heads + kv_heads, D].
            qk = qkv[:, : self.q_size + self.kv_size].view(
                tokens, self.num_heads + self.num_kv_heads, self.head_dim
            )
            q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(tokens, self.num_heads, self.head_dim))
            k = self.k_norm(
                qkv[:, self.q_size : self.q_size + self.kv_size].view(
                    tokens, self.num_kv_heads, self.head_dim
                )
            )
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, attn, self.scale)
        return self.o_proj(out.reshape(tokens, self.q_size))


class MLP(nn.Module):
    """With tensor parallelism, this rank's slice of the inner features."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None, quant: QuantSpec | None,
                 tp: TensorParallel | None = None):
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r}")
        ranks = 1 if tp is None else tp.size
        if tp is not None:
            tp.shard(config.intermediate_size, "intermediate_size")
        self.intermediate_size = config.intermediate_size // ranks
        self.gate_up_proj = column_parallel(
            config.hidden_size, [config.intermediate_size] * 2, False, tp=tp, quant=quant, dtype=dtype
        )
        self.down_proj = row_parallel(config.intermediate_size, config.hidden_size, tp=tp, quant=quant, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None, quant: QuantSpec | None,
                 tp: TensorParallel | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, quant, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, quant, tp)

    def forward(self, x, cos, sin, kv_cache, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


# HF parameter name -> (module path relative to the layer, shard index) for fused projections.
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "self_attn.o_proj": ("self_attn.o_proj", 0),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.down_proj": ("mlp.down_proj", 0),
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(\w+)")


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches, attn) -> hidden [T, hidden]; compute_logits -> fp32.

    With `tp` (tensor parallelism over more than one rank) every rank builds its shard and every rank must
    make the same forward and compute_logits calls (their collectives pair up); hidden states and logits
    come out whole on every rank."""

    def __init__(self, config: LlamaConfig, dtype: torch.dtype | None = None, quant: QuantSpec | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        if config.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {config.architecture!r}")
        self.config = config
        tp = None if tp is None or tp.size == 1 else tp
        self.embed_tokens = vocab_embedding(config.vocab_size, config.hidden_size, dtype, tp)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_parameters, config.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype, quant, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = lm_head(config.vocab_size, config.hidden_size, dtype, tp)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv_cache, attn)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab]."""
        return self.lm_head(hidden)

    # ---- weight loading: one entry point, HF names -------------------------------------------------

    def expected_weights(self) -> set[str]:
        """HF names a checkpoint must provide (lm_head.weight only when untied)."""
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.config.tie_word_embeddings:
            names.add("lm_head.weight")
        for i in range(self.config.num_layers):
            prefix = f"model.layers.{i}."
            names |= {prefix + "input_layernorm.weight", prefix + "post_attention_layernorm.weight"}
            names |= {prefix + hf + ".weight" for hf in _FUSED}
            if self.config.attention_bias:
                names |= {prefix + f"self_attn.{p}_proj.bias" for p in "qkv"}
            if self.config.qk_norm:
                names |= {prefix + "self_attn.q_norm.weight", prefix + "self_attn.k_norm.weight"}
        return names

    @torch.no_grad()
    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        """Assign one HF-named tensor. Raises KeyError for an unknown name, ValueError for a bad shape."""
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            module = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}.get(
                name, self.lm_head
            )
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                return  # tied: the embedding provides it (some checkpoints still store a copy)
            if hasattr(module, "load_weight"):
                module.load_weight(tensor)  # vocabulary-parallel: keeps its range
            else:
                _copy_param(module.weight, tensor)
            return
        match = _LAYER_NAME.fullmatch(name)
        if match is None or int(match.group(1)) >= self.config.num_layers:
            raise KeyError(name)
        layer = self.layers[int(match.group(1))]
        part, kind = match.group(2), match.group(3)
        if part in _FUSED:
            path, shard = _FUSED[part]
            layer.get_submodule(path).load_shard(shard, kind, tensor)
            return
        try:
            module = layer.get_submodule(part)
        except AttributeError:
            raise KeyError(name) from None
        if module is None or kind != "weight":
            raise KeyError(name)
        _copy_param(module.weight, tensor)


def _copy_param(param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"bad shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
    param.copy_(tensor)
