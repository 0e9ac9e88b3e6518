"""Batched next-token sampling.

Rows without penalties, filters or logprobs take a plain argmax. A seeded request draws from its own
torch.Generator, so the same seed gives the same tokens whatever else is in the batch. Logprobs are those
of the model's raw distribution (before temperature, penalties and filters), as OpenAI reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (logprob of the chosen token, [(token id, logprob)] of the top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """OpenAI presence/frequency penalties over generated tokens; repetition penalty over all tokens."""
    vocab = logits.shape[1]
    for row, seq in zip(rows, seqs, strict=True):
        p = seq.params
        out = seq.output_token_ids
        if (p.presence_penalty or p.frequency_penalty) and out:
            counts = torch.bincount(torch.tensor(out), minlength=vocab)[:vocab].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long)
            seen = seen[seen < vocab]
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask (to -inf) tokens outside top-k, the top-p nucleus, or below min_p x the top probability.
    top_k 0 = off; top_p 1 = off; min_p 0 = off. Operates in place on temperature-scaled logits."""
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        threshold = probs.max(-1, keepdim=True).values * min_p.unsqueeze(1)
        logits.masked_fill_(probs < threshold, float("-inf"))
    use_k = bool((top_k > 0).any())
    use_p = bool((top_p < 1).any())
    if not (use_k or use_p):
        return
    sorted_logits, order = logits.sort(-1, descending=True)
    vocab = logits.shape[1]
    if use_k:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if use_p:
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        sorted_logits.masked_fill_(before >= top_p.unsqueeze(1), float("-inf"))
    logits.scatter_(1, order, sorted_logits)


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: float32 [N, vocab], one row per sequence in `seqs`."""
        params = [s.params for s in seqs]
        want_logprobs = [p.logprobs for p in params]
        raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        if penalized:
            logits = logits.clone()
            apply_penalties(logits, penalized, [seqs[i] for i in penalized])
        greedy = [p.greedy for p in params]
        tokens = logits.argmax(-1)
        sampled_rows = [i for i, g in enumerate(greedy) if not g]
        if sampled_rows:
            tokens[sampled_rows] = self._sample(logits[sampled_rows], [seqs[i] for i in sampled_rows])
        token_list = tokens.tolist()
        logprobs: list = [None] * len(seqs)
        if raw_logprobs is not None:
            for i, p in enumerate(params):
                if p.logprobs:
                    row = raw_logprobs[i]
                    top = []
                    if p.top_logprobs:
                        vals, ids = row.topk(p.top_logprobs)
                        top = list(zip(ids.tolist(), vals.tolist(), strict=True))
                    logprobs[i] = (float(row[token_list[i]]), top)
        return SampleResult(token_list, logprobs)

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype)
        logits = logits / temps.unsqueeze(1)
        filter_logits(
            logits,
            torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params], dtype=logits.dtype),
            torch.tensor([p.min_p for p in params], dtype=logits.dtype),
        )
        probs = logits.softmax(-1)
        # Exponential race (argmax of p / E, E ~ Exp(1)) samples from probs; seeded rows draw E from
        # their own generator.
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=probs.device).manual_seed(seq.params.seed + seq.index)
                noise[row].exponential_(generator=seq.generator)
        return (probs / noise).argmax(-1)
