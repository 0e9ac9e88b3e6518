"""Tensor-parallel layers (Megatron-LM's split): the model asks for them by role, and at one rank gets the
plain layer back, so a single-device model is built exactly as before.

- column-parallel (q/k/v, gate/up): each rank keeps its share of every logical output part's rows; the
  output stays sharded (this rank's heads, this rank's slice of the MLP's inner features).
- row-parallel (o_proj, down_proj): each rank keeps the matching slice of the input features; the partial
  products are summed with one all-reduce.
- vocabulary-parallel embedding and LM head: each rank keeps a contiguous range of the vocabulary (padded
  up to a multiple of the ranks); the embedding all-reduces (rows outside the range are zero), the head
  all-gathers its logits.

The loader still hands every layer the whole checkpoint tensor (`load_shard` / `load_weight`); the layer
cuts its share. Quantized GGUF tensors are cut on their raw blocks: rows anywhere, input columns only at
quantization-block boundaries (GGUFTensor.columns refuses otherwise).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from engine.distributed import TensorParallel
from engine.layers.embedding import LMHead, VocabEmbedding
from engine.layers.linear import QuantSpec, make_linear


def _rows(tensor, start: int, end: int):
    return tensor.rows(start, end) if hasattr(tensor, "rows") else tensor[start:end]


def _columns(tensor, start: int, end: int):
    if not hasattr(tensor, "columns"):
        return tensor[:, start:end]
    try:
        return tensor.columns(start, end)
    except ValueError as exc:
        raise ValueError(f"{exc}; use a --tensor-parallel-size that splits it between blocks") from None


def _check_piece(param_name: str) -> None:
    if param_name not in ("weight", "bias"):
        raise ValueError(f"a projection stored as {param_name!r} pieces cannot be split across ranks "
                         "(only dense and GGUF weights shard); use --tensor-parallel-size 1")


class ColumnParallelLinear(nn.Module):
    """This rank's rows of each logical output part; y is this rank's share, no communication."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool, *, tp: TensorParallel,
                 quant: QuantSpec | None, dtype: torch.dtype | None):
        super().__init__()
        self.full_sizes = list(output_sizes)
        self.ranges = [tp.shard(size, "a projection's output features") for size in self.full_sizes]
        self.inner = make_linear(in_features, [end - start for start, end in self.ranges], bias, quant=quant,
                                 dtype=dtype)

    def load_shard(self, index: int, param_name: str, tensor) -> None:
        _check_piece(param_name)
        if tensor.shape[0] != self.full_sizes[index]:
            raise ValueError(f"bad shape {tuple(tensor.shape)}, expected {self.full_sizes[index]} rows")
        start, end = self.ranges[index]
        self.inner.load_shard(index, param_name, _rows(tensor, start, end))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class RowParallelLinear(nn.Module):
    """This rank's slice of the input features; the ranks' partial outputs are summed (no bias)."""

    def __init__(self, in_features: int, output_size: int, *, tp: TensorParallel, quant: QuantSpec | None,
                 dtype: torch.dtype | None):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.start, self.end = tp.shard(in_features, "a projection's input features")
        self.inner = make_linear(self.end - self.start, output_size, False, quant=quant, dtype=dtype)

    def load_shard(self, index: int, param_name: str, tensor) -> None:
        _check_piece(param_name)
        if param_name != "weight" or len(tensor.shape) != 2 or tensor.shape[1] != self.in_features:
            raise ValueError(f"unexpected {param_name} of shape {tuple(tensor.shape)} for a row-parallel projection")
        self.inner.load_shard(index, param_name, _columns(tensor, self.start, self.end))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.inner(x))


class VocabParallelEmbedding(nn.Module):
    """Token ids -> embeddings from this rank's vocabulary range, summed over the ranks."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        per_rank = -(-vocab_size // tp.size)
        self.start = tp.rank * per_rank
        self.num_rows = max(0, min(vocab_size - self.start, per_rank))  # the rest is padding (zeros)
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size, dtype=dtype), requires_grad=False)

    @torch.no_grad()
    def load_weight(self, tensor: torch.Tensor) -> None:
        if tuple(tensor.shape) != (self.vocab_size, self.weight.shape[1]):
            raise ValueError(f"bad shape {tuple(tensor.shape)}, expected {(self.vocab_size, self.weight.shape[1])}")
        self.weight[: self.num_rows].copy_(tensor[self.start:self.start + self.num_rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill_(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """hidden -> float32 logits over the whole vocabulary: this rank's range, all-gathered. Tied models
    point `weight` at the embedding's (same range, same padding)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather_last_dim(F.linear(hidden, self.weight))
        return logits[..., : self.vocab_size].float()


def _single(tp: TensorParallel | None) -> bool:
    return tp is None or tp.size == 1


def column_parallel(in_features: int, output_sizes: int | Sequence[int], bias: bool = False, *,
                    tp: TensorParallel | None, quant: QuantSpec | None, dtype: torch.dtype | None) -> nn.Module:
    if _single(tp):
        return make_linear(in_features, output_sizes, bias, quant=quant, dtype=dtype)
    sizes = [output_sizes] if isinstance(output_sizes, int) else list(output_sizes)
    return ColumnParallelLinear(in_features, sizes, bias, tp=tp, quant=quant, dtype=dtype)


def row_parallel(in_features: int, output_size: int, *, tp: TensorParallel | None, quant: QuantSpec | None,
                 dtype: torch.dtype | None) -> nn.Module:
    if _single(tp):
        return make_linear(in_features, output_size, False, quant=quant, dtype=dtype)
    return RowParallelLinear(in_features, output_size, tp=tp, quant=quant, dtype=dtype)


def vocab_embedding(vocab_size: int, hidden_size: int, dtype: torch.dtype | None,
                    tp: TensorParallel | None) -> nn.Module:
    if _single(tp):
        return VocabEmbedding(vocab_size, hidden_size, dtype)
    return VocabParallelEmbedding(vocab_size, hidden_size, dtype, tp)


def lm_head(vocab_size: int, hidden_size: int, dtype: torch.dtype | None, tp: TensorParallel | None) -> nn.Module:
    if _single(tp):
        return LMHead(vocab_size, hidden_size, dtype)
    return ParallelLMHead(vocab_size, hidden_size, dtype, tp)
