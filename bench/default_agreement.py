"""Greedy agreement between the engine's default (the fast CPU mode for a quantized GGUF) and the exact mode.

    .venv/bin/python bench/default_agreement.py [--model PATH] [--max-tokens 32] [--threads 2]

The default is, on CPU, the fast mode: bfloat16 (a GGUF's 4-bit projections stay packed for ATen's int4 GEMM); the exact mode is float32 (dequantized dense weights, transformers' logits). Both
run the same chat prompts greedily in-process (the offline `LLM`, the same engine the server wraps) and the
script reports, per prompt, how many leading tokens agree: the share of prompts whose answers are identical
and the mean share of agreeing leading tokens. Greedy decoding amplifies the first differing argmax, so the
prefix measure is the fairer one for "how often does rounding change the answer".
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from engine import LLM, SamplingParams
from engine.loader import demo_model_path

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
    "Who wrote Romeo and Juliet?",
    "Give me a tip for learning to code.",
    "What does a CPU do?",
    "Name a mammal that can fly.",
    "Why is the sky blue?",
    "Write a short greeting for a birthday card.",
    "What is the boiling point of water in Celsius?",
    "Describe a cat in five words.",
    "What is the largest planet in the solar system?",
    "Suggest a name for a pet goldfish.",
    "How many days are in a leap year?",
    "What is the opposite of 'hot'?",
    "Tell me a fun fact about octopuses.",
    "What language is spoken in Brazil?",
    "Summarise the plot of Cinderella in one sentence.",
    "What is the square root of 81?",
    "Give an example of a renewable energy source.",
    "What colour do you get by mixing blue and yellow?",
]


def greedy_tokens(model: str, dtype: torch.dtype | None, max_tokens: int) -> tuple[list[list[int]], torch.dtype]:
    """Each chat prompt's greedy answer (`max_tokens` tokens, ignore_eos) from `model` in `dtype` (None: the
    default) and the dtype it ran in."""
    llm = LLM(model, dtype=dtype, kv_cache_memory=256 << 20)
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    answers = [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    return answers, llm.engine.loaded.spec.dtype


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(demo_model_path()))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    exact, _ = greedy_tokens(args.model, torch.float32, args.max_tokens)
    quick, fast = greedy_tokens(args.model, None, args.max_tokens)
    prefixes = [common_prefix(a, b) for a, b in zip(exact, quick, strict=True)]
    identical = sum(p == args.max_tokens for p in prefixes)
    result = {
        "model": os.path.basename(args.model), "default_dtype": str(fast).removeprefix("torch."),
        "prompts": len(PROMPTS), "max_tokens": args.max_tokens,
        "identical_answers": identical, "identical_rate": round(identical / len(PROMPTS), 3),
        "mean_agreeing_prefix": round(sum(prefixes) / (len(PROMPTS) * args.max_tokens), 3),
        "first_difference_at": prefixes, "seconds": round(time.perf_counter() - started, 1),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
