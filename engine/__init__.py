"""Our inference engine: paged KV cache, continuous batching, prefix caching, an OpenAI-compatible server.

Offline use: `LLM(path).generate(prompts, SamplingParams(...))`; serving: `python -m engine serve --model PATH`.
This package never imports Django.
"""

from engine.llm_engine import LLM, LLMEngine
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams"]
