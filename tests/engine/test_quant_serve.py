"""Quantized models served by `python -m engine serve` (a real subprocess, the official openai client)."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from engine import LLM, SamplingParams
from engine.loader import default_dtype, demo_model_path
from tests.engine.test_quant_models import quantize_checkpoint
from tests.processes import start_engine, stop

pytestmark = pytest.mark.slow


def serve(model: Path, *extra: str):
    """Start the engine server on `model`; (process, openai client)."""
    proc, url = start_engine(model, "--served-model-name", "m", "--kv-cache-memory", "64MiB",
                             "--max-model-len", "512", "--threads", "2", *extra)
    return proc, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("fmt", ["awq", "gptq", "fp8-channel"])
def test_quantized_checkpoint_is_served(tmp_path, fmt):
    quantized, _ = quantize_checkpoint("llama", fmt, tmp_path)
    prompt = "The quick brown fox jumps over"
    expected = LLM(str(quantized)).generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))[0]
    proc, client = serve(quantized, "--dtype", "float32")  # LLM's (the library's) exact default
    try:
        served = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0)
    finally:
        stop(proc, timeout=20)
    # the same quantized weights and kernels behind the HTTP API as in-process
    assert served.choices[0].text == expected.outputs[0].text
    assert served.usage.completion_tokens == expected.num_output_tokens


def test_smollm2_served_by_default_as_in_process():
    """`engine serve --model FILE` without --dtype gives what the library's default gives in-process (on this
    CPU: bfloat16, 4-bit weights packed): the same greedy text for one request. Not a fixed string: the fast
    mode's near-ties fall by the CPU's kernels (AMX or AVX512), so only the exact mode is pinned to text."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    llm = LLM(str(demo_model_path()), kv_cache_memory=64 << 20, max_model_len=512)
    prompt = llm.tokenizer.apply_chat_template(messages)
    expected = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    proc, client = serve(demo_model_path())
    try:
        reply = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    finally:
        stop(proc, timeout=20)
    assert reply.choices[0].message.content == expected
    assert llm.engine.loaded.spec.dtype == default_dtype("cpu", packed_weights=True)
