"""The sampler alone: one `Sampler()` call on a batch of SmolLM2-sized logits, per sampling mode.

Issue 11's target is sampled decoding (temperature 0.7, top_p 0.9) within 10% of greedy throughput at
batch 32, so what the sampler adds over greedy is what counts. The logits are Zipf-shaped (a language
model's few likely tokens and a long tail), fixed by a seed.

    .venv/bin/python bench/sampler_step.py [--batch 32] [--threads 1] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import torch

from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

VOCAB = 49152  # SmolLM2's

MODES = {
    "greedy": {"temperature": 0.0},
    "temperature 0.7": {"temperature": 0.7},
    "temperature 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "temperature 0.7, top_k 40": {"temperature": 0.7, "top_k": 40},
    "temperature 0.7, top_p 0.9, seeded": {"temperature": 0.7, "top_p": 0.9, "seed": 1},
}


def zipf_logits(batch: int, seed: int = 0) -> torch.Tensor:
    """Per row, log-probabilities of a Zipf law over a random permutation of the vocabulary, plus noise."""
    generator = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float32)
    rows = []
    for _ in range(batch):
        order = torch.randperm(VOCAB, generator=generator)
        row = torch.empty(VOCAB)
        row[order] = -1.1 * ranks.log() + 0.3 * torch.randn(VOCAB, generator=generator)
        rows.append(row * 2.0)
    return torch.stack(rows)


def time_mode(sampler: Sampler, logits: torch.Tensor, params: dict, repeats: int) -> float:
    """Best of `repeats` calls, in milliseconds; fresh sequences each call (a seeded one makes its generator)."""
    best = float("inf")
    for _ in range(repeats):
        seqs = [Sequence(f"r{i}", [1, 2, 3], SamplingParams(**params), max_tokens=100) for i in range(len(logits))]
        start = time.perf_counter()
        sampler(logits, seqs)
        best = min(best, time.perf_counter() - start)
    return best * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logits = zipf_logits(args.batch)
    sampler = Sampler()
    print(f"batch {args.batch}, vocabulary {VOCAB}, {args.threads} torch thread(s), best of {args.repeats}")
    greedy = None
    for name, params in MODES.items():
        ms = time_mode(sampler, logits, params, args.repeats)
        greedy = ms if greedy is None else greedy
        print(f"{name:40s} {ms:8.2f} ms  (+{ms - greedy:.2f} ms over greedy)")


if __name__ == "__main__":
    main()
