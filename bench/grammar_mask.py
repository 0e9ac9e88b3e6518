"""What the structured-output mask costs one sampling step, at batch 1 and 32 (SmolLM2's 49,152 tokens).

    python bench/grammar_mask.py [--threads 2] [--device cpu|cuda] [--steps 40] [--repeat 3]

For each batch size: every row constrained by a JSON schema (its llguidance matcher advanced along a real
answer, one token per step, so each step's mask is a fresh one: structural positions and inside strings),
against the same batch unconstrained. Reported per step, median over the steps (the best of `--repeat` runs: the machine may be shared), in
milliseconds:
- `fill`: llguidance computing the rows' bitmasks (its thread pool);
- `mask`: `apply_grammar_masks` in all (fill + checks + the bias lookup and add on the logits);
- `sampler free` / `sampler constrained`: `Sampler()(logits, seqs)`, greedy, without and with grammars.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.guides import json_guide  # noqa: E402
from engine.loader import demo_model_path, load_model  # noqa: E402
from engine.sampler import Sampler  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402
from engine.structured import Grammars, _pool, apply_grammar_masks  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string",
                                                                                   "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"]}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}
ANSWER = ('{"name": "Ada Lovelace, Countess of Lovelace", "age": 36, "tags": ["red", "blue", "green"], '
          '"address": {"city": "London, Marylebone", "zip": "12345"}}')


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loaded = load_model(demo_model_path())
    vocab = loaded.spec.vocab_size
    grammars = Grammars(loaded.tokenizer, vocab, loaded.eos_token_ids)
    guide = json_guide(SCHEMA)
    answer = grammars.tokenizer().tokenize_str(ANSWER)
    steps = min(args.steps, len(answer) - 1)
    sampler = Sampler()
    print(f"vocab {vocab}, torch threads {args.threads}, device {device}, {steps} steps, "
          f"llguidance pool {type(_pool()).__name__}\n")
    print("| batch | fill (ms) | mask (ms) | sampler free (ms) | sampler constrained (ms) | mask per row (ms) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in (1, 32):
        runs = [measure(batch, grammars, guide, answer, steps, vocab, device, sampler) for _ in range(args.repeat)]
        med = [min(run[k] for run in runs) for k in range(4)]
        print(f"| {batch} | {med[0]:.3f} | {med[1]:.3f} | {med[2]:.3f} | {med[3]:.3f} | {med[1] / batch:.3f} |")
    print("\nload average " + " ".join(f"{x:.2f}" for x in os.getloadavg()))


def measure(batch, grammars, guide, answer, steps, vocab, device, sampler) -> list[float]:
    free = [Sequence("free", [1], SamplingParams(temperature=0), 10**6) for _ in range(batch)]
    constrained = [Sequence("json", [1], SamplingParams(temperature=0), 10**6) for _ in range(batch)]
    for seq in constrained:
        seq.grammar = grammars.matcher(guide)
    logits = torch.randn(batch, vocab, device=device)
    fills, masks, frees, cons = [], [], [], []
    from llguidance.torch import fill_next_token_bitmask_par

    bitmask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
    for step in range(steps):
        t = time.perf_counter()
        fill_next_token_bitmask_par(_pool(), [(s.grammar, i) for i, s in enumerate(constrained)], bitmask)
        fills.append(time.perf_counter() - t)
        scratch = logits.clone()
        sync(device)
        t = time.perf_counter()
        apply_grammar_masks(scratch, list(range(batch)), constrained)
        sync(device)
        masks.append(time.perf_counter() - t)
        t = time.perf_counter()
        sampler(logits, free)
        sync(device)
        frees.append(time.perf_counter() - t)
        t = time.perf_counter()
        sampler(logits, constrained)
        sync(device)
        cons.append(time.perf_counter() - t)
        for seq in constrained:  # the next token of the answer: a new parser state every step
            assert seq.grammar.consume_token(answer[step]), seq.grammar.get_error()
    return [statistics.median(x) * 1000 for x in (fills, masks, frees, cons)]


if __name__ == "__main__":
    main()
