"""Hugging Face directory: config.json, *.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tokenizers import Tokenizer as BackendTokenizer

from engine.distributed import TensorParallel
from engine.layers.linear import QuantSpec
from engine.layers.rotary import SUPPORTED_ROPE_TYPES
from engine.loader import (
    LoadedModel,
    ModelLoadError,
    build_model,
    model_spec,
    resident_bytes,
    unique_ids,
)
from engine.models.llama import LlamaConfig
from engine.support import DECODER_ARCHITECTURES
from engine.tokenizer import SPECIAL_TOKEN_NAMES, Tokenizer, select_chat_template, token_content

# HF model_type -> our architecture name.
MODEL_TYPES = {name: name for name in DECODER_ARCHITECTURES}
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def read_json(path: Path, required: bool = True) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path}: missing file")
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc})") from None


def rope_parameters(config: dict, source: Path) -> dict:
    """Normalise transformers 4 (`rope_theta` + `rope_scaling`) and 5 (`rope_parameters`) configs."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: unsupported rope type {params['rope_type']!r} (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", config.get("max_position_embeddings"))
    return params


def parse_config(config: dict, source: Path) -> LlamaConfig:
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: unsupported architecture {model_type!r} (supported: {', '.join(sorted(MODEL_TYPES))})"
        )
    if config.get("use_sliding_window"):
        raise ModelLoadError(f"{source}: sliding-window attention is not supported")
    if config.get("mlp_bias"):
        raise ModelLoadError(f"{source}: MLP bias is not supported")
    try:
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        architecture = MODEL_TYPES[model_type]
        return LlamaConfig(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_parameters=rope_parameters(config, source),
            attention_bias=architecture == "qwen2" or bool(config.get("attention_bias", False)),
            qk_norm=architecture == "qwen3",
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden_act=config.get("hidden_act", "silu"),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{source}: missing config key {exc.args[0]!r}") from None


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, handle.get_tensor(name), str(file)
        except Exception as exc:  # safetensors raises its own SafetensorError (an Exception)
            raise ModelLoadError(f"{file}: unreadable safetensors file ({exc})") from None


def load_tokenizer(directory: Path) -> Tokenizer:
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelLoadError(f"{tokenizer_file}: missing file")
    try:
        backend = BackendTokenizer.from_file(str(tokenizer_file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise ModelLoadError(f"{tokenizer_file}: unreadable tokenizer ({exc})") from None
    config = read_json(directory / "tokenizer_config.json", required=False)
    template = select_chat_template(config.get("chat_template"))
    jinja_file = directory / "chat_template.jinja"  # transformers 5 saves the template here
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    elif template is None:
        template = select_chat_template(
            read_json(directory / "chat_template.json", required=False).get("chat_template")
        )
    special = {name: token_content(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return Tokenizer(backend, special_tokens=special, chat_template=template)


def quantization(quantization_config: dict, source: Path) -> QuantSpec:
    """AWQ / GPTQ / FP8 checkpoints: weights stay quantized (engine/quant converts them at load)."""
    from engine.quant import quant_config_from_hf

    try:
        return quant_config_from_hf(quantization_config)
    except ValueError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None


def load_hf_directory(
    directory: Path, *, dtype: torch.dtype, device: str | torch.device, quant: QuantSpec | None,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    config_path = directory / "config.json"
    raw_config = read_json(config_path)
    config = parse_config(raw_config, config_path)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weight files")
    if raw_config.get("quantization_config"):
        from engine.quant import DEQUANTIZED

        if quant is DEQUANTIZED:
            raise ModelLoadError(f"{config_path}: --quantization dense: this checkpoint's quantized weights "
                                 "(quantization_config) load only packed; use --quantization auto")
        if quant is None:
            quant = quantization(raw_config["quantization_config"], config_path)
    tokenizer = load_tokenizer(directory)
    # A missing tensor is reported against the weight file (or the directory when sharded).
    source = str(files[0]) if len(files) == 1 else f"{directory} (*.safetensors)"
    model = build_model(
        config, iter_safetensors(files), dtype=dtype, device=device, quant=quant, source=source, tp=tp
    )
    generation = read_json(directory / "generation_config.json", required=False)
    eos = unique_ids(generation.get("eos_token_id"), raw_config.get("eos_token_id"), tokenizer.eos_token_id)
    defaults = {key: generation[key] for key in GENERATION_DEFAULT_KEYS if generation.get(key) is not None}
    return LoadedModel(
        model=model,
        spec=model_spec(config, dtype),
        tokenizer=tokenizer,
        eos_token_ids=eos,
        generation_defaults=defaults,
        name=directory.resolve().name,
        weight_bytes=resident_bytes(model),
    )
