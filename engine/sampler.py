"""Batched next-token sampling.

Rows without penalties, logit bias, filters or logprobs take a plain argmax. top-k / top-p look at the
best CANDIDATE_WIDTHS tokens, not a sort of the vocabulary, where that is exact. Every sampled row draws
one uniform and takes the token where it falls in the filtered distribution's CDF (inverse CDF); a seeded
request's uniform comes from its own torch.Generator, and which candidates a row is drawn from depends on
that row alone, so the same seed gives the same tokens whatever else is in the batch; each choice of an
n > 1 request gets its own stream, seeded by a hash of (seed, index). Logprobs are those of the
model's raw distribution (before temperature, penalties, logit bias and filters), as OpenAI reports them.
Every tensor built here lives on the logits' device.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from engine.sequence import Sequence
from engine.structured import apply_grammar_masks


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (logprob of the chosen token, [(token id, logprob)] of the top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    # per row: None, or why sampling that row failed (set by ModelRunner.sample; its request fails alone)
    errors: list[BaseException | None] = field(default_factory=list)


def choice_seed(seed: int, index: int) -> int:
    """The generator seed of choice `index` of a request seeded with `seed` (any integer a client may send).

    A SHA-256 over both values, cut to 63 bits so torch's manual_seed always accepts it. Unlike
    `seed + index`, it cannot overflow, and choice 1 of seed s does not replay choice 0 of seed s + 1.
    """
    digest = hashlib.sha256(f"{seed},{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def apply_penalties(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """OpenAI presence/frequency penalties over generated tokens; repetition penalty over all tokens."""
    vocab = logits.shape[1]
    device = logits.device
    for row, seq in zip(rows, seqs, strict=True):
        p = seq.params
        out = seq.output_token_ids
        if (p.presence_penalty or p.frequency_penalty) and out:
            counts = torch.bincount(torch.tensor(out, device=device), minlength=vocab)[:vocab].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=device)
            seen = seen[seen < vocab]
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)


def apply_logit_bias(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """Add each row's OpenAI logit_bias (token id -> bias) to its logits, in one scatter for the batch.
    Ids outside the vocabulary are skipped (the request layer rejects them; a stray one must not fail the
    whole batch)."""
    vocab = logits.shape[1]
    row_ids: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for row, seq in zip(rows, seqs, strict=True):
        for token, bias in seq.params.logit_bias.items():
            if 0 <= token < vocab:
                row_ids.append(row)
                token_ids.append(token)
                biases.append(bias)
    if not row_ids:
        return
    device = logits.device
    index = (torch.tensor(row_ids, dtype=torch.long, device=device),
             torch.tensor(token_ids, dtype=torch.long, device=device))
    logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def mask_early_stops(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """min_tokens: a sequence with fewer than that many tokens out cannot sample a stop token (EOS, its
    stop_token_ids), in one masked fill for the batch. Ids outside the vocabulary are skipped."""
    vocab = logits.shape[1]
    row_ids = [row for row, seq in zip(rows, seqs, strict=True) for t in seq.min_tokens_stop_ids if t < vocab]
    token_ids = [t for seq in seqs for t in seq.min_tokens_stop_ids if t < vocab]
    if row_ids:
        device = logits.device
        logits.index_put_((torch.tensor(row_ids, dtype=torch.long, device=device),
                           torch.tensor(token_ids, dtype=torch.long, device=device)),
                          torch.tensor(float("-inf"), dtype=logits.dtype, device=device))


# Top-k / top-p rows first take their best 64 tokens, then 1024 (one partial selection each, not a sort of
# the vocabulary). Exact: a top-k row within the width keeps only those; a top-p row whose candidates hold
# at least top_p of the probability has its whole nucleus among them (every later token has >= top_p of the
# mass above it). Only the rows that fit neither (a flat distribution) sort the whole vocabulary.
CANDIDATE_WIDTHS = (64, 1024)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask (to -inf) tokens outside top-k, the top-p nucleus, or below min_p x the top probability.
    top_k 0 = off; top_p 1 = off; min_p 0 = off. Operates in place on temperature-scaled logits. The most
    likely token always survives."""
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        threshold = probs.max(-1, keepdim=True).values * min_p.unsqueeze(1)
        logits.masked_fill_(probs < threshold, float("-inf"))
    found, pending = candidate_nuclei(logits, top_k, top_p, ((top_k > 0) | (top_p < 1)).nonzero().squeeze(1))
    for rows, kept, ids in found:
        logits[rows] = torch.full((len(rows), logits.shape[1]), float("-inf"), dtype=logits.dtype,
                                  device=logits.device).scatter_(1, ids, kept)
    if pending.numel():
        ordered, order = logits[pending].sort(-1, descending=True)
        _keep_nucleus(ordered, top_k[pending], top_p[pending], None)
        logits[pending] = ordered.scatter(1, order, ordered)


def candidate_nuclei(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, pending: torch.Tensor
                     ) -> tuple[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """The top-k / top-p choice of the `pending` rows of temperature-scaled `logits`, found among each
    row's best CANDIDATE_WIDTHS tokens: ([(rows, kept, ids)], rows that fit no width: a flat top-p row, or
    a top_k above the widest). `kept` are those
    rows' best tokens' logits, descending, the ones outside the choice masked to -inf; `ids` their token
    ids. Every token outside `kept` is outside the choice, so `kept` alone is the filtered distribution."""
    found = []
    vocab = logits.shape[1]
    for width in CANDIDATE_WIDTHS:
        if not pending.numel() or width >= vocab:
            break
        k, p = top_k[pending], top_p[pending]
        rows = logits if len(pending) == len(logits) else logits[pending]
        values, ids = rows.topk(width, dim=-1)  # descending, like a sort's first `width` columns
        mass = rows.logsumexp(-1)
        # Which width serves a row depends on that row alone (not on a neighbour's top_k): a seeded row
        # draws from the same candidates in any batch.
        fits = torch.where(k > 0, k <= width, (values - mass.unsqueeze(1)).exp().sum(-1) >= p)
        if bool(fits.any()):
            kept = values[fits]  # a copy (boolean index): masked in place
            _keep_nucleus(kept, k[fits], p[fits], mass[fits])
            found.append((pending[fits], kept, ids[fits]))
        pending = pending[~fits]
    return found, pending


def _keep_nucleus(ordered: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  mass: torch.Tensor | None) -> None:
    """Mask, in place, the columns of descending `ordered` logits outside top-k and then the top-p nucleus.
    `ordered` is a row's best tokens with `mass` its logsumexp over the whole vocabulary (the nucleus of a
    row without top-k is measured against all of its probability), or whole sorted rows with `mass` None."""
    width = ordered.shape[1]
    use_k = top_k > 0
    if bool(use_k.any()):
        k = torch.where(use_k, top_k, width).clamp(max=width)
        kth = ordered.gather(1, (k - 1).unsqueeze(1))
        ordered.masked_fill_(ordered < kth, float("-inf"))
        if mass is not None:  # after top-k the nucleus is of the renormalised k best, all in `ordered`
            mass = torch.where(use_k, ordered.logsumexp(-1), mass)
    if bool((top_p < 1).any()):
        probs = ordered.softmax(-1) if mass is None else (ordered - mass.unsqueeze(1)).exp()
        before = probs.cumsum(-1) - probs  # mass strictly above each token
        outside = before >= top_p.unsqueeze(1)
        outside[:, 0] = False  # top_p 0 keeps the most likely token, not nothing
        ordered.masked_fill_(outside, float("-inf"))


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """logits: float32 [N, vocab], one row per sequence in `seqs`."""
        params = [s.params for s in seqs]
        want_logprobs = [p.logprobs for p in params]
        raw_logprobs = logits.log_softmax(-1) if any(want_logprobs) else None
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        biased = [i for i, p in enumerate(params) if p.logit_bias]
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        # min_tokens; not on constrained rows, whose grammar decides when the answer is complete
        early = [i for i, s in enumerate(seqs) if s.min_tokens_stop_ids and s.grammar is None
                 and s.num_output_tokens < s.params.min_tokens]
        if penalized or biased or constrained or early:
            logits = logits.clone()  # the caller's logits (and raw_logprobs) stay those of the model
            if penalized:
                apply_penalties(logits, penalized, [seqs[i] for i in penalized])
            if biased:
                apply_logit_bias(logits, biased, [seqs[i] for i in biased])
            if early:
                mask_early_stops(logits, early, [seqs[i] for i in early])
            if constrained:  # last: a grammar's forbidden tokens stay forbidden whatever the bias
                apply_grammar_masks(logits, constrained, [seqs[i] for i in constrained])
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(sampled_rows) == len(seqs):  # no greedy row: no argmax, no copy of the rows
            tokens = self._sample(logits, seqs)
        else:
            tokens = logits.argmax(-1)
            if sampled_rows:
                rows = torch.tensor(sampled_rows, dtype=torch.long, device=logits.device)
                tokens[rows] = self._sample(logits[rows], [seqs[i] for i in sampled_rows])
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
        device, vocab = logits.device, logits.shape[1]
        temps = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        logits = logits / temps.unsqueeze(1)
        # top_k at or past the vocabulary keeps everything: off (and a client's 2**63 fits no int64).
        top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else 0 for p in params], dtype=torch.long,
                             device=device)
        top_p = torch.tensor([p.top_p for p in params], dtype=logits.dtype, device=device)
        min_p = torch.tensor([p.min_p for p in params], dtype=logits.dtype, device=device)
        uniform = _uniforms(seqs, logits.dtype, device)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=device)
        # A top-k / top-p row draws among its candidates alone: the filtered distribution without a pass
        # over the rest of the vocabulary (what costs the time at batch 32).
        narrow = [i for i, p in enumerate(params) if not p.min_p and ((0 < p.top_k < vocab) or p.top_p < 1)]
        drawn: set[int] = set()
        if narrow:
            found, _ = candidate_nuclei(logits, top_k, top_p, torch.tensor(narrow, dtype=torch.long, device=device))
            for rows, kept, ids in found:
                # descending: column 0 is the row's maximum (never masked), so these are finite weights
                choice = _inverse_cdf((kept - kept[:, :1]).exp(), uniform[rows])
                tokens[rows] = ids.gather(1, choice.unsqueeze(1)).squeeze(1)
                drawn.update(rows.tolist())
        rest = [i for i in range(len(seqs)) if i not in drawn]
        if not rest:
            return tokens
        index = torch.tensor(rest, dtype=torch.long, device=device)
        if len(rest) < len(seqs):
            logits = logits[index]
        filter_logits(logits, top_k[index], top_p[index], min_p[index])
        tokens[index] = _inverse_cdf(logits.softmax(-1), uniform[index])
        return tokens


def _uniforms(seqs: list[Sequence], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row: a seeded sequence's from its own generator (created on first use from
    `choice_seed`), the others' from torch's global one, in one call."""
    uniform = torch.rand(len(seqs), dtype=dtype, device=device)
    for row, seq in enumerate(seqs):
        if seq.params.seed is not None:
            if seq.generator is None:
                seq.generator = torch.Generator(device=device).manual_seed(choice_seed(seq.params.seed, seq.index))
            uniform[row] = torch.rand((), dtype=dtype, device=device, generator=seq.generator)
    return uniform


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds `uniform` x the row's total. The
    draw is clamped below the total (float rounding of u x total could reach it), so some token always
    exceeds it, and the first one that does has a non-zero probability: a masked token is never chosen."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    draw = torch.minimum(uniform.unsqueeze(1) * total, total.nextafter(torch.zeros_like(total)))
    return torch.searchsorted(cdf, draw, right=True).squeeze(1)

