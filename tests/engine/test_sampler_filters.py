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
    k = torch.where(top_k > 0, top_k, logits.shape[1])
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


def narrow_row() -> torch.Tensor:
    """A peaked row of 4,096 logits (the draws below stay fast): its top_p 0.5 is 14 tokens, top_p 0.9 273."""
    return torch.randn(4096, generator=torch.Generator().manual_seed(7)) * 3.0


def draws(row: torch.Tensor, calls: int, **params) -> torch.Tensor:
    """Token ids drawn for `row` by `calls` batches of 64 identical unseeded requests."""
    logits = row.repeat(64, 1)
    seqs = [Sequence("r", [1], SamplingParams(**params), max_tokens=10) for _ in range(64)]
    return torch.tensor([t for _ in range(calls) for t in Sampler()(logits, seqs).token_ids])


def filtered_distribution(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    kept = by_full_sort(row.unsqueeze(0) / temperature, torch.tensor([top_k]), torch.tensor([top_p]))
    return kept.softmax(-1)[0]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 0.5), (2.0, 5, 1.0), (0.7, 12, 0.8)])
def test_unseeded_narrow_rows_draw_from_their_candidates_with_the_filtered_distribution(
        monkeypatch, temperature, top_k, top_p):
    """A top-k / top-p row whose choice lies in its best 64 tokens is drawn among them alone (the full-
    vocabulary filter is never run), with the probabilities the full sort gives."""
    monkeypatch.setattr("engine.sampler.filter_logits", lambda *a: pytest.fail("the whole vocabulary was filtered"))
    torch.manual_seed(11)
    row = narrow_row()
    expected = filtered_distribution(row, temperature, top_k, top_p)
    assert 1 < int((expected > 0).sum()) <= CANDIDATE_WIDTHS[0]
    drawn = draws(row, 50, temperature=temperature, top_k=top_k, top_p=top_p)
    assert bool((expected[drawn] > 0).all())  # never a token outside the choice
    observed = torch.bincount(drawn, minlength=len(row)) / len(drawn)
    assert float((observed - expected).abs().sum() / 2) < 0.08  # total variation over 3,200 draws


def test_a_nucleus_past_the_first_width_is_drawn_among_the_second(monkeypatch):
    monkeypatch.setattr("engine.sampler.filter_logits", lambda *a: pytest.fail("the whole vocabulary was filtered"))
    torch.manual_seed(12)
    row = narrow_row()
    expected = filtered_distribution(row, 1.0, 0, 0.9)
    assert CANDIDATE_WIDTHS[0] < int((expected > 0).sum()) <= CANDIDATE_WIDTHS[1]
    drawn = draws(row, 20, temperature=1.0, top_p=0.9)
    assert bool((expected[drawn] > 0).all())
    assert len(set(drawn.tolist())) > CANDIDATE_WIDTHS[0]  # reached past the first 64


def test_a_batch_mixing_candidate_draws_and_full_vocabulary_rows_gives_each_row_its_own_answer():
    """Narrow rows draw from their candidates; a flat top-p row, a seeded row, a min_p row and a plain
    temperature row go through the whole vocabulary; a greedy row takes its argmax; each row's answer is
    what it would be alone."""
    torch.manual_seed(13)
    peaked, flat = rows(True, 1)[0], rows(False, 1)[0]
    batch = [
        (peaked, {"temperature": 1.0, "top_p": 0.5}),
        (flat, {"temperature": 1.0, "top_p": 0.3}),
        (peaked, {"temperature": 1.0, "top_p": 0.9, "seed": 5}),
        (peaked, {"temperature": 1.0, "min_p": 0.5}),
        (flat, {"temperature": 1.0}),
        (peaked, {"temperature": 0.0}),
    ]
    seqs = [Sequence(f"r{i}", [1], SamplingParams(**p), max_tokens=10) for i, (_, p) in enumerate(batch)]
    tokens = Sampler()(torch.stack([row for row, _ in batch]), seqs).token_ids
    assert filtered_distribution(peaked, 1.0, 0, 0.5)[tokens[0]] > 0
    assert filtered_distribution(flat, 1.0, 0, 0.3)[tokens[1]] > 0
    alone = Sampler()(peaked.unsqueeze(0), [Sequence("a", [1], SamplingParams(**batch[2][1]), max_tokens=10)])
    assert tokens[2] == alone.token_ids[0]
    probs = peaked.softmax(-1)
    assert probs[tokens[3]] >= 0.5 * probs.max()
    assert tokens[5] == int(peaked.argmax())


def test_a_seeded_row_draws_the_same_tokens_whatever_top_k_its_neighbours_ask_for():
    """Which candidates serve a row depends on that row alone: a neighbour's top_k (here past the first
    width, and past the widest) once widened every row's candidates, and among the ties of bfloat16-rounded
    logits a wider selection may order tied tokens differently, so a seeded row drew another token."""
    generator = torch.Generator().manual_seed(11)
    steps = [(torch.randn(1, VOCAB, generator=generator) * 3).bfloat16().float() for _ in range(12)]

    def run(neighbour_params: list[dict]) -> list[int]:
        target = Sequence("t", [1], SamplingParams(temperature=0.8, top_p=0.9, seed=42), max_tokens=100)
        others = [Sequence(f"n{i}", [1], SamplingParams(**p), max_tokens=100) for i, p in enumerate(neighbour_params)]
        tokens = []
        for row in steps:
            logits = torch.cat([(torch.randn(len(others), VOCAB, generator=generator) * 3), row])
            tokens.append(Sampler()(logits, [*others, target]).token_ids[-1])
        return tokens

    alone = run([])
    assert run([{"temperature": 1.0, "top_k": 500}, {"temperature": 1.0}]) == alone
    assert run([{"temperature": 0.7, "top_k": 3000, "top_p": 0.5}, {"temperature": 1.0, "seed": 1}]) == alone


# -- mutation round 5 ----------------------------------------------------------------------------


def test_rows_without_top_k_or_top_p_are_left_whole_even_when_their_best_tokens_hold_all_the_mass():
    """A row asking for neither filter is not cut to its candidates, even when float rounding makes its
    best 64 tokens hold all of its probability (a peaked row whose tail underflows); nor is a top-k row's
    k best cut further by a top_p of 1."""
    logits = (-100.0 - torch.arange(VOCAB) * 1e-3).repeat(2, 1)  # distinct: top-k keeps exactly k (no ties)
    logits[:, 0] = 0.0
    filter_logits(logits, torch.tensor([0, 100]), torch.tensor([1.0, 1.0]), torch.zeros(2))
    assert bool(torch.isfinite(logits[0]).all())
    assert int(torch.isfinite(logits[1]).sum()) == 100


def test_min_p_holds_on_a_row_that_also_asks_for_top_k():
    """min_p 0.5 excludes a token at 0.37 of the best one's probability, with a top_k that keeps it."""
    logits = torch.full((1, VOCAB), -1e9)
    logits[0, :2] = torch.tensor([0.0, -1.0])
    row = Sequence("r", [1], SamplingParams(temperature=1.0, top_k=10, min_p=0.5), max_tokens=10)
    assert {Sampler()(logits.clone(), [row]).token_ids[0] for _ in range(300)} == {0}


def test_candidates_with_large_logits_are_drawn_in_proportion():
    """The draw among candidates works on weights relative to the best (no exp overflow): logits near 60
    after temperature still give tokens 0 and 1 in their e : 1 proportion."""
    torch.manual_seed(5)
    logits = torch.full((1, VOCAB), -1e9)
    logits[0, :3] = torch.tensor([60.0, 59.0, 40.0])
    rows = [Sequence(f"r{i}", [1], SamplingParams(temperature=1.0, top_p=0.99), max_tokens=10) for i in range(2000)]
    tokens = torch.tensor(Sampler()(logits.repeat(len(rows), 1), rows).token_ids)
    share = float((tokens == 1).float().mean())
    assert set(tokens.tolist()) <= {0, 1} and abs(share - 1 / (1 + torch.e)) < 0.04, share


@pytest.mark.parametrize("params", [
    {"temperature": 1.0, "top_k": 5}, {"temperature": 1.0, "top_p": 0.8}, {"temperature": 1.0, "top_p": 0.8, "seed": 3},
    {"temperature": 1.0, "top_p": 0.95, "scale": 0.05},  # flat: the full sort serves it
    {"temperature": 1.0, "top_k": 5, "min_p": 0.1},  # min_p: filter_logits' tiers, then the full softmax
])
def test_the_candidate_tiers_build_their_tensors_on_the_logits_device(params):
    """Over a vocabulary wider than the candidate widths (the small one of test_device_placement.py skips
    the tiers): every tensor of the tiers, the draw and a seeded row's uniform made on the logits' device."""
    from tests.engine.fake_device import FakeDevice

    params = dict(params)
    scale = params.pop("scale", 4.0)
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB) * scale
    rows = [Sequence("r", [1], SamplingParams(**params), max_tokens=10),
            Sequence("g", [1], SamplingParams(temperature=0), max_tokens=10)]
    with FakeDevice() as dev:
        out = Sampler()(dev.put(logits), rows)
    assert 0 <= out.token_ids[0] < VOCAB and out.token_ids[1] == int(logits[1].argmax())
