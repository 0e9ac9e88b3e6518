"""top-k / top-p over a real-sized vocabulary: the candidate pre-filter (engine.sampler.CANDIDATE_WIDTHS)
keeps exactly the tokens that sorting the whole vocabulary keeps, on the rows it serves and on the rows
that fall back to the sort."""

import pytest
import torch

from engine.sampler import CANDIDATE_WIDTHS, Sampler, _inverse_cdf, filter_logits
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

torch.set_num_threads(2)
VOCAB = 49152  # SmolLM2's


def by_full_sort(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The definition: sort the whole row, keep its top-k, then the smallest prefix holding top_p; a row
    with neither is left alone (top_p 1 is off: no cumulative-sum rounding may cut its tail)."""
    off = (top_k == 0) & (top_p >= 1)
    ordered, order = logits.sort(-1, descending=True)
    k = torch.where(top_k > 0, top_k, VOCAB)
    ordered.masked_fill_(ordered < ordered.gather(1, (k - 1).unsqueeze(1)), float("-inf"))
    probs = ordered.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p.unsqueeze(1)
    outside[:, 0] = False
    outside[off] = False
    ordered.masked_fill_(outside, float("-inf"))
    return ordered.scatter(1, order, ordered)


def rows(peaked: bool, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7 if peaked else 8)
    scale = 4.0 if peaked else 0.05  # a peaked distribution holds top_p in a few tokens; a flat one does not
    return torch.randn(count, VOCAB, generator=generator) * scale


@pytest.mark.parametrize("peaked", [True, False], ids=["peaked: candidates hold the nucleus", "flat: full sort"])
def test_candidates_keep_what_the_full_sort_keeps(peaked):
    top_k = torch.tensor([0, 0, 0, 40, CANDIDATE_WIDTHS[0] + 30, 1, 0, 5])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.9, 0.95, 0.9, 0.0, 1.0])
    logits = rows(peaked, len(top_k))
    expected = by_full_sort(logits.clone(), top_k, top_p)
    filter_logits(logits, top_k, top_p, torch.zeros(len(top_k)))
    assert torch.equal(torch.isfinite(logits), torch.isfinite(expected))
    assert torch.equal(logits[torch.isfinite(logits)], expected[torch.isfinite(expected)])
    kept = torch.isfinite(logits).sum(-1)
    assert kept[2] == VOCAB and kept[5] == 1 and kept[6] == 1  # off; top_k 1; top_p 0
    if peaked:  # the first width holds row 1's nucleus, the second row 0's
        assert kept[1] <= CANDIDATE_WIDTHS[0] < kept[0] <= CANDIDATE_WIDTHS[1]
    else:
        assert kept[0] > CANDIDATE_WIDTHS[-1]  # the nucleus reaches past the candidates: the sort served it


def test_inverse_cdf_never_draws_a_masked_token_even_at_the_extremes():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    for u in (0.0, 0.25, 0.5, 0.75, 1.0 - 2**-24, 1.0):  # 1.0: what u x total may round up to
        drawn = _inverse_cdf(probs, torch.full((2,), u))
        assert probs[torch.arange(2), drawn].gt(0).all(), u


def test_unseeded_rows_follow_the_filtered_distribution():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(4000, 1)
    seqs = [Sequence("r", [1], SamplingParams(temperature=1.0, top_p=0.8), max_tokens=10) for _ in range(4000)]
    counts = torch.bincount(torch.tensor(Sampler()(logits, seqs).token_ids), minlength=4)
    assert counts[2:].sum() == 0  # outside the nucleus
    assert abs(counts[0] / 4000 - 0.5 / 0.8) < 0.03 and abs(counts[1] / 4000 - 0.3 / 0.8) < 0.03
