"""GGUF file: hyperparameters, tokenizer and chat template from its metadata; tensors renamed to HF names.

Quantized tensors are dequantized to the compute dtype at load (gguf.quants.dequantize). llama.cpp's
converter permutes Llama q/k projection rows for its rotary layout; they are un-permuted back to the HF
layout here, as transformers' GGUF loader does (Qwen files are not permuted).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from engine.distributed import TensorParallel
from engine.layers.linear import QuantSpec
from engine.loader import (
    LoadedModel,
    ModelLoadError,
    build_model,
    default_dtype,
    model_spec,
    resident_bytes,
    unique_ids,
)
from engine.models.llama import ARCHITECTURES, LlamaConfig
from engine.tokenizer import Tokenizer

# GGUF tensor name pieces -> HF names.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_UNQUANTIZED = {
    gguf.GGMLQuantizationType.F32,
    gguf.GGMLQuantizationType.F16,
}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4


def hf_tensor_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


class GGUFMetadata:
    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: missing metadata key {key}")
        return value


def parse_config(meta: GGUFMetadata, tensor_names: set[str]) -> LlamaConfig:
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{meta.path}: unsupported architecture {arch!r} (supported: {', '.join(ARCHITECTURES)})"
        )
    hidden = int(meta.require(f"{arch}.embedding_length"))
    heads = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    context = int(meta.get(f"{arch}.context_length", 2048))
    rope = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0))}
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(meta.require(f"{arch}.rope.scaling.factor")))
    elif scaling == "yarn":
        rope.update(
            rope_type="yarn",
            factor=float(meta.require(f"{arch}.rope.scaling.factor")),
            original_max_position_embeddings=int(
                meta.require(f"{arch}.rope.scaling.original_context_length")
            ),
        )
    elif scaling not in (None, "none"):
        raise ModelLoadError(f"{meta.path}: unsupported rope scaling {scaling!r}")
    freq_factors = next((t for t in meta.reader.tensors if t.name == "rope_freqs.weight"), None)
    if freq_factors is not None:
        # llama.cpp stores Llama 3.1+ rope scaling as divisors of the base frequencies (same result as llama3).
        rope["freq_factors"] = np.asarray(freq_factors.data, dtype=np.float32).reshape(-1).tolist()
    tokens = meta.reader.get_field("tokenizer.ggml.tokens")
    vocab_size = meta.get(f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab_size is None:
        raise ModelLoadError(f"{meta.path}: missing metadata key {arch}.vocab_size")
    return LlamaConfig(
        architecture=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(meta.require(f"{arch}.feed_forward_length")),
        num_layers=int(meta.require(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or heads),
        head_dim=head_dim,
        max_position_embeddings=context,
        rms_norm_eps=float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def _unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows (HF keeps the two rotary halves apart)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iter_tensors(
    reader: gguf.GGUFReader, config: LlamaConfig, path: Path, keep_quantized: tuple[str, ...] = ()
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """HF-named tensors; projections of a type in `keep_quantized` stay raw GGUF blocks (GGUFTensor)."""
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        raw = tensor.tensor_type.name in keep_quantized and name.endswith("_proj.weight")
        try:
            if raw:
                data = np.array(tensor.data)  # [out, bytes per row]: rows are whole output channels
            elif tensor.tensor_type in _UNQUANTIZED:
                data = np.array(tensor.data)  # copy: the reader maps the file read-only
            else:
                data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ModelLoadError(
                f"{path}: tensor {tensor.name}: unsupported quantization {tensor.tensor_type.name}"
            ) from None
        # GGUF lists dims fastest-first; numpy's shape is the reverse (= the HF [out, in] layout).
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if not raw:
            data = data.reshape(shape)
        if config.architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            if data.shape[0] % (2 * heads):
                raise ModelLoadError(
                    f"{path}: tensor {tensor.name}: bad shape {data.shape} for {heads} heads"
                )
            data = _unpermute_rotary(data, heads)
        if raw:
            from engine.quant import GGUFTensor

            yield name, GGUFTensor(np.ascontiguousarray(data), tensor.tensor_type.name, shape), str(path)
            continue
        yield name, torch.from_numpy(np.ascontiguousarray(data)), str(path)


def build_tokenizer(meta: GGUFMetadata) -> Tokenizer:
    """A `tokenizers` Tokenizer equivalent to the one transformers builds from the same metadata."""
    kind = meta.require("tokenizer.ggml.model")
    tokens = [str(t) for t in meta.require("tokenizer.ggml.tokens")]
    token_types = list(meta.get("tokenizer.ggml.token_type") or [])
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError(
            f"{meta.path}: tokenizer without merges (tokenizer.ggml.merges) is not supported"
        )
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    if kind == "gpt2":  # byte-level BPE (Llama 3, Qwen, SmolLM)
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        byte_map = _bytes_to_unicode()
        vocab = {
            (t if set(t) <= alphabet else "".join(byte_map[b] for b in t.encode("utf-8"))): i
            for i, t in enumerate(tokens)
        }
        backend = BackendTokenizer(
            models.BPE(vocab, merge_pairs, continuing_subword_prefix="", end_of_word_suffix="")
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
        if split is not None:
            from tokenizers import Regex

            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        special_ok = alphabet
    elif kind == "llama":  # sentencepiece BPE with byte fallback (Llama 2)
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = BackendTokenizer(models.BPE(vocab, merge_pairs, fuse_unk=True, byte_fallback=True))
        add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
        special_ok = None
    else:
        raise ModelLoadError(f"{meta.path}: unsupported tokenizer model {kind!r}")

    control = [
        AddedToken(t, normalized=False, special=True)
        for t, kind_id in zip(tokens, token_types, strict=False)
        if kind_id == TOKEN_TYPE_CONTROL and (special_ok is None or set(t) <= special_ok)
    ]
    backend.add_special_tokens(control)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, kind_id in zip(tokens, token_types, strict=False)
        if kind_id == TOKEN_TYPE_USER_DEFINED
    ]
    if user:
        backend.add_tokens(user)

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None

    special = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and special["bos_token"] is not None:
        bos = special["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    return Tokenizer(backend, special_tokens=special, chat_template=meta.get("tokenizer.chat_template"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# tokenizer.ggml.pre -> the split regex its merges were learned with (others use GPT-2's).
_PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def load_gguf_file(
    path: Path, *, dtype: torch.dtype | None, device: str | torch.device, quant: QuantSpec | None,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """dtype None: the default for this file (`default_dtype`: the fast bfloat16 mode for quantized weights
    kept packed for ATen's CPU int4 GEMM)."""
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct errors on a truncated or foreign file
        raise ModelLoadError(f"{path}: unreadable GGUF file ({exc})") from None
    meta = GGUFMetadata(reader, path)
    tensor_names = {t.name for t in reader.tensors}
    config = parse_config(meta, tensor_names)
    tokenizer = build_tokenizer(meta)
    keep: tuple[str, ...] = ()
    quantized = any(t.tensor_type not in _UNQUANTIZED for t in reader.tensors)
    if dtype is None:
        packed = quantized and (quant is None or getattr(quant, "method", None) == "gguf")
        dtype = default_dtype(device, packed_weights=packed)
    if quant is None and quantized:
        from engine.quant import gguf_quantization

        quant = gguf_quantization(dtype, device)
    if getattr(quant, "method", None) == "gguf":
        # Quantized projections stay quantized in memory (engine/quant kernels); embeddings and
        # types the kernels do not take are dequantized as before.
        from engine.quant.formats import GGUF_TYPES

        keep = GGUF_TYPES
    model = build_model(
        config, iter_tensors(reader, config, path, keep), dtype=dtype, device=device, quant=quant, source=str(path),
        tp=tp,
    )
    eos = unique_ids(
        meta.get("tokenizer.ggml.eos_token_id"),
        meta.get("tokenizer.ggml.eot_token_id"),
        meta.get("tokenizer.ggml.eom_token_id"),
    )
    return LoadedModel(
        model=model,
        spec=model_spec(config, dtype),
        tokenizer=tokenizer,
        eos_token_ids=eos,
        generation_defaults={},
        name=path.stem,
        weight_bytes=resident_bytes(model),
    )
