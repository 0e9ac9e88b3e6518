"""Our inference engine: paged KV cache, continuous batching, prefix caching, an OpenAI-compatible server.

Offline use: `LLM(path).generate(prompts, SamplingParams(...))`; serving: `python -m engine serve --model PATH`.
This package never imports Django.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.llm_engine import LLM, LLMEngine
    from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams"]
_HOMES = {"LLM": "engine.llm_engine", "LLMEngine": "engine.llm_engine", "SamplingParams": "engine.sampling_params"}


def __getattr__(name: str):
    """Import torch-heavy modules on first use, so `engine.telemetry` stays light for the control plane."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
