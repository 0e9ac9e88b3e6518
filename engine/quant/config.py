"""QuantConfig: which on-disk format a checkpoint uses, parsed once from its quantization_config.

It is the QuantSpec that engine/layers/linear.py's `make_linear` hands projections to, and it knows which
checkpoint tensors make up one quantized weight (`convert`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from engine.quant import formats
from engine.quant.linear import Part, QuantLinear

# Tensor names that complete one quantized weight, per method (the loader expects these, not "weight").
_PIECES = {
    "awq": ("qweight", "qzeros", "scales"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "fp8": ("weight", "weight_scale"),
    "fp8_block": ("weight", "weight_scale_inv"),  # compressed-tensors names it weight_scale
    "int8": ("weight", "weight_scale"),
    "gguf": ("weight",),
}


@dataclass(frozen=True)
class GGUFTensor:
    """A GGUF tensor still in its raw blocks: `raw` [N, bytes per row] uint8, `qtype` e.g. "Q4_1"."""

    raw: np.ndarray
    qtype: str
    shape: tuple[int, int]  # (N, K): HF orientation

    def permute_rows(self, order: np.ndarray) -> GGUFTensor:
        """Reorder output rows (llama.cpp's q/k rotary permutation is undone this way, on raw blocks)."""
        return GGUFTensor(self.raw[order], self.qtype, self.shape)

    def rows(self, start: int, end: int) -> GGUFTensor:
        """Output rows [start, end) (a column-parallel shard): rows are whole, so any split is exact."""
        return GGUFTensor(self.raw[start:end], self.qtype, (end - start, self.shape[1]))

    def columns(self, start: int, end: int) -> GGUFTensor:
        """Input columns [start, end) (a row-parallel shard), cut between quantization blocks; ValueError
        when a bound falls inside a block (the block's scale covers both sides)."""
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[self.qtype]]
        if start % block or end % block:
            raise ValueError(f"a {self.qtype} tensor of {self.shape[1]} input features cannot be split at "
                             f"{start}:{end}: its quantization blocks are {block} wide")
        raw = np.ascontiguousarray(self.raw[:, start // block * nbytes:end // block * nbytes])
        return GGUFTensor(raw, self.qtype, (self.shape[0], end - start))


@dataclass(frozen=True)
class QuantConfig:
    method: str  # "awq" | "gptq" | "fp8" | "fp8_block" | "int8" | "gguf"
    group_size: int = 128
    zero_offset: int = 1  # GPTQ v1 stores zero - 1
    block_size: tuple[int, int] | None = None  # fp8 block-wise scales

    @property
    def weight_names(self) -> tuple[str, ...]:
        return _PIECES[self.method]

    @property
    def ignored_names(self) -> frozenset[str]:
        """Checkpoint tensors that belong to a quantized linear but are not needed for W*A16."""
        return frozenset({"input_scale", "weight_zero_point", "input_zero_point"})

    def logical_name(self, name: str) -> str:
        """ "...q_proj.qweight" -> "...q_proj.weight": the name the model expects for the whole weight."""
        base, _, suffix = name.rpartition(".")
        return f"{base}.weight" if suffix in self.weight_names or suffix in self.ignored_names else name

    def create_linear(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype | None
    ) -> QuantLinear:
        return QuantLinear(in_features, output_sizes, bias, dtype, self)

    def convert(self, pieces: dict[str, object]) -> Part | None:
        """The part's weight once every piece is in, else None."""
        weight = pieces.get("weight")
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and weight.element_size() > 1:
            return weight  # a projection the checkpoint left unquantized (modules_to_not_convert / ignore)
        if isinstance(weight, GGUFTensor):
            if weight.qtype in ("F32", "F16", "BF16"):
                return torch.as_tensor(np.asarray(weight.raw)).reshape(weight.shape)
            return formats.from_gguf(weight.raw, weight.qtype, weight.shape)
        names = self.weight_names
        if self.method == "fp8_block" and "weight_scale" in pieces:
            pieces["weight_scale_inv"] = pieces.pop("weight_scale")
        unexpected = set(pieces) - set(names) - self.ignored_names
        if unexpected:
            raise ValueError(f"unexpected tensor {sorted(unexpected)[0]!r} for a {self.method} projection")
        if not all(name in pieces for name in names):
            return None
        p = pieces
        if self.method == "awq":
            return formats.from_awq(p["qweight"], p["qzeros"], p["scales"], self.group_size)
        if self.method == "gptq":
            return formats.from_gptq(
                p["qweight"],
                p["qzeros"],
                p["scales"],
                p["g_idx"],
                self.group_size,
                zero_offset=self.zero_offset,
            )
        if self.method in ("fp8", "int8"):
            return formats.from_8bit(p["weight"], p["weight_scale"])
        if self.method == "fp8_block":
            return formats.from_8bit(p["weight"], p["weight_scale_inv"], self.block_size)
        raise ValueError(f"{self.method}: expected a GGUF tensor")


def quant_config_from_hf(qc: dict) -> QuantConfig:
    """config.json's quantization_config -> QuantConfig; ValueError naming what is unsupported."""
    method = str(qc.get("quant_method", "")).lower()
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if qc.get("bits", qc.get("w_bit", 4)) != 4 or version != "gemm" or not qc.get("zero_point", True):
            raise ValueError(f"AWQ: only 4-bit GEMM with zero points is supported (got {qc})")
        return QuantConfig("awq", int(qc.get("group_size", qc.get("q_group_size", 128))))
    if method == "gptq":
        if qc.get("bits", 4) != 4:
            raise ValueError(f"GPTQ: only 4-bit is supported (got bits={qc.get('bits')})")
        if qc.get("desc_act", False):
            raise ValueError("GPTQ: desc_act (act-order) checkpoints are not supported")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        return QuantConfig("gptq", int(qc.get("group_size", 128)), zero_offset=0 if fmt == "gptq_v2" else 1)
    if method in ("fp8", "fbgemm_fp8"):
        block = qc.get("weight_block_size")
        if block:
            return QuantConfig("fp8_block", block_size=(int(block[0]), int(block[1])))
        return QuantConfig("fp8")
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    raise ValueError(
        f"quantization method {method or qc!r} is not supported (awq, gptq, fp8, fbgemm_fp8, compressed-tensors)"
    )


def _compressed_tensors(qc: dict) -> QuantConfig:
    groups = list((qc.get("config_groups") or {}).values())
    schemes = {
        (w.get("num_bits"), w.get("type"), w.get("strategy"), tuple(w.get("block_structure") or ()))
        for w in (g.get("weights") or {} for g in groups)
    }
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors: expected one weight scheme, got {sorted(map(str, schemes))}")
    bits, kind, strategy, block = schemes.pop()
    if bits == 8 and kind == "float" and strategy in ("tensor", "channel"):
        return QuantConfig("fp8")
    if bits == 8 and kind == "float" and strategy == "block" and len(block) == 2:
        return QuantConfig("fp8_block", block_size=(int(block[0]), int(block[1])))
    if bits == 8 and kind == "int" and strategy in ("tensor", "channel"):
        return QuantConfig("int8")
    raise ValueError(f"compressed-tensors: weights of {bits}-bit {kind} {strategy} are not supported")


class Dequantized:
    """QuantSpec that builds plain dense projections: `load_model(path, quant=DEQUANTIZED)` loads a GGUF
    file the old way (every tensor dequantized to the compute dtype), for comparisons and benchmarks."""

    def create_linear(
        self, in_features: int, output_sizes: Sequence[int], bias: bool, dtype: torch.dtype | None
    ):
        from engine.layers.linear import Linear

        return Linear(in_features, output_sizes, bias, dtype)


DEQUANTIZED = Dequantized()


def gguf_quantization(dtype: torch.dtype, device: str | torch.device) -> QuantConfig | None:
    """Default for a quantized GGUF file: keep its projections quantized wherever that is not slower than
    dense, i.e. on CUDA (Triton W4A16/W8A16) and on CPU in bfloat16 (ATen's int4 GEMM). A float32 CPU
    model gets dense dequantized weights unless the caller asks for QuantConfig("gguf") (exact, slower)."""
    if torch.device(device).type == "cuda" or dtype == torch.bfloat16:
        return QuantConfig("gguf")
    return None
