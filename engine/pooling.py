"""How an encoder's token states become one embedding: the sentence-transformers modules of the directory.

`modules.json` lists the pipeline (Transformer → Pooling → optional Normalize); `1_Pooling/config.json`
says which pooling (mean of the real tokens, the CLS token, or the last token); `sentence_bert_config.json`
the longest input the model was trained for. A directory without them is a plain encoder: mean pooling,
no normalization, as sentence-transformers does for a bare Hugging Face model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

POOLING_MODES = ("mean", "cls", "lasttoken")
_MODE_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "lasttoken"}
_UNSUPPORTED_KEYS = ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")


class PoolingConfigError(ValueError):
    """The sentence-transformers modules ask for something this engine does not do."""


@dataclass(frozen=True)
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # sentence_bert_config.json: the longest input, in tokens

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise PoolingConfigError(f"unsupported pooling mode {self.mode!r} (supported: {', '.join(POOLING_MODES)})")


def _json(path: Path) -> dict | list | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PoolingConfigError(f"{path}: unreadable JSON ({exc})") from None


def read_pooling(directory: Path) -> PoolingConfig:
    modules = _json(directory / "modules.json") or []
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    extra = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
    if extra:
        raise PoolingConfigError(f"{directory / 'modules.json'}: unsupported sentence-transformers modules: "
                                 f"{', '.join(extra)}")
    mode = "mean"
    if "Pooling" in kinds:
        path = directory / (kinds["Pooling"].get("path") or "1_Pooling") / "config.json"
        config = _json(path)
        if not isinstance(config, dict):
            raise PoolingConfigError(f"{path}: missing file (modules.json lists a Pooling module)")
        chosen = [mode for key, mode in _MODE_KEYS.items() if config.get(key)]
        unsupported = [key for key in _UNSUPPORTED_KEYS if config.get(key)]
        if unsupported or len(chosen) != 1:
            raise PoolingConfigError(f"{path}: exactly one of {', '.join(_MODE_KEYS)} must be true "
                                     f"(unsupported: {', '.join(unsupported) or 'none'})")
        mode = chosen[0]
    bert_config = _json(directory / "sentence_bert_config.json") or {}
    max_len = bert_config.get("max_seq_length")
    return PoolingConfig(mode=mode, normalize="Normalize" in kinds,
                         max_seq_length=int(max_len) if isinstance(max_len, int) and max_len > 0 else None)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, L, H] states and [B, L] real-token mask (right padding) -> [B, H] in float32."""
    hidden = hidden.float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def finish(vector: torch.Tensor, *, normalize: bool, dimensions: int | None) -> torch.Tensor:
    """One pooled vector as the API returns it: truncated to `dimensions` (then re-normalized, as OpenAI's
    shortened embeddings are) and L2-normalized when the model's modules say so."""
    if dimensions is not None:
        vector = vector[..., :dimensions]
    return F.normalize(vector, p=2, dim=-1) if normalize else vector
