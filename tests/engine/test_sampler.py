"""Sampler: greedy, penalties, top-k / top-p / min-p, seeds independent of batch neighbours, logprobs."""

import pytest
import torch

from engine.sampler import (
    Sampler,
    apply_logit_bias,
    apply_penalties,
    choice_seed,
    filter_logits,
    mask_early_stops,
)
from engine.sampling_params import SamplingParamError, SamplingParams
from engine.sequence import Sequence

torch.set_num_threads(2)
VOCAB = 50


def seq(prompt=(1, 2, 3), output=(), **params):
    s = Sequence("r", list(prompt), SamplingParams(**params), max_tokens=100)
    s.token_ids += list(output)
    return s


def test_greedy_is_argmax():
    logits = torch.randn(3, VOCAB)
    out = Sampler()(logits, [seq(temperature=0) for _ in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None, None, None]


def test_presence_and_frequency_penalties_hit_generated_tokens_only():
    logits = torch.zeros(1, VOCAB)
    s = seq(prompt=(4,), output=(5, 5, 6), presence_penalty=0.5, frequency_penalty=0.25)
    apply_penalties(logits, [0], [s])
    assert logits[0, 5].item() == pytest.approx(-(0.5 + 2 * 0.25))
    assert logits[0, 6].item() == pytest.approx(-(0.5 + 0.25))
    assert logits[0, 4].item() == 0.0  # prompt token untouched
    assert logits[0, 7].item() == 0.0


def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.zeros(1, VOCAB)
    logits[0, 1], logits[0, 2], logits[0, 9] = 2.0, -2.0, 3.0
    apply_penalties(logits, [0], [seq(prompt=(1,), output=(2,), repetition_penalty=2.0)])
    assert logits[0, 1].item() == 1.0 and logits[0, 2].item() == -4.0 and logits[0, 9].item() == 3.0


def test_penalties_change_the_greedy_choice():
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    out = Sampler()(logits, [seq(output=(5,), temperature=0, presence_penalty=0.5)])
    assert out.token_ids == [6]


def test_top_k_keeps_k_best():
    logits = torch.arange(VOCAB, dtype=torch.float32).repeat(2, 1)
    filter_logits(logits, torch.tensor([3, 0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [47, 48, 49]
    assert torch.isfinite(logits[1]).all()  # top_k 0: off


def test_top_p_keeps_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    filter_logits(logits, torch.tensor([0]), torch.tensor([0.8]), torch.tensor([0.0]))
    assert torch.isfinite(logits[0]).tolist() == [True, True, False, False]
    logits = probs.log()
    filter_logits(logits, torch.tensor([0]), torch.tensor([0.81]), torch.tensor([0.0]))
    assert torch.isfinite(logits[0]).tolist() == [True, True, True, False]


def test_min_p_drops_tokens_below_a_fraction_of_the_top():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    filter_logits(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([0.2]))  # threshold 0.1
    assert torch.isfinite(logits[0]).tolist() == [True, True, True, False]


def test_sampling_respects_filters():
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB).repeat(64, 1)
    allowed = set(logits[0].topk(2).indices.tolist())
    out = Sampler()(logits, [seq(temperature=1.5, top_k=2) for _ in range(64)])
    assert set(out.token_ids) <= allowed and len(set(out.token_ids)) == 2


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(3000, 1)
    out = Sampler()(logits, [seq(temperature=1.0) for _ in range(3000)])
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=3).float() / 3000
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.04)


def test_seed_reproduces_regardless_of_batch_neighbours():
    torch.manual_seed(1)
    steps = [torch.randn(1, VOCAB) for _ in range(8)]

    def run(neighbours: int) -> list[int]:
        target = seq(temperature=1.0, top_p=0.95, seed=1234)
        others = [seq(temperature=1.0) for _ in range(neighbours)]
        tokens = []
        for row in steps:
            logits = torch.cat([torch.randn(neighbours, VOCAB), row]) if neighbours else row.clone()
            tokens.append(Sampler()(logits, [*others, target]).token_ids[-1])
        return tokens

    alone = run(0)
    assert run(5) == alone and run(13) == alone
    other_seed = seq(temperature=1.0, top_p=0.95, seed=4321)
    assert [Sampler()(r.clone(), [other_seed]).token_ids[0] for r in steps] != alone


def test_logprobs_are_of_the_raw_distribution():
    logits = torch.randn(3, VOCAB)
    logits[1] = 0.0
    logits[1, 7], logits[1, 8] = 1.0, 0.5  # token 7 leads until the penalty pushes it below token 8
    out = Sampler()(
        logits,
        [
            seq(temperature=0, logprobs=True, top_logprobs=3),
            seq(output=(7,), temperature=0, logprobs=True, top_logprobs=2, presence_penalty=2.0),
            seq(temperature=0, logprobs=True),
        ],
    )
    ref = logits.log_softmax(-1)
    chosen, top = out.logprobs[0]
    assert chosen == pytest.approx(ref[0].max().item(), abs=1e-6)
    assert [t for t, _ in top] == ref[0].topk(3).indices.tolist()
    # The penalty changed the choice, not the reported distribution: the raw logprob of the chosen token,
    # and the raw top alternatives (the penalised token 7 still first).
    assert out.token_ids[1] == 8
    chosen, top = out.logprobs[1]
    assert chosen == pytest.approx(ref[1, 8].item(), abs=1e-6)
    assert [t for t, _ in top] == [7, 8]
    assert [v for _, v in top] == pytest.approx([ref[1, 7].item(), ref[1, 8].item()], abs=1e-6)
    assert out.logprobs[2] == (pytest.approx(ref[2].max().item(), abs=1e-6), [])  # no top_logprobs asked


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a"] * 5}, "stop"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
    ],
)
def test_invalid_params_name_the_field(kwargs, param):
    with pytest.raises(SamplingParamError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and isinstance(info.value, ValueError)


# -- seeds ---------------------------------------------------------------------------------------


def draws(s: Sequence, steps: int = 12) -> list[int]:
    """Tokens a seeded sequence samples from a flat distribution over VOCAB (its random stream)."""
    return [Sampler()(torch.zeros(1, VOCAB), [s]).token_ids[0] for _ in range(steps)]


def choice(seed, index):
    """A seeded choice; the seed is set past validation so any integer a client may send is tried."""
    s = seq(temperature=1.0, seed=0)
    s.params.seed, s.index = seed, index
    return s


@pytest.mark.parametrize("seed", [2**64 - 1, 2**63, 2**63 - 1, -(2**63), -1, 0])
def test_every_api_seed_samples_for_every_choice(seed):
    first, second = choice(seed, 0), choice(seed, 1)
    out = Sampler()(torch.zeros(2, VOCAB), [first, second])
    assert all(0 <= t < VOCAB for t in out.token_ids)
    assert draws(choice(seed, 1)) != draws(choice(seed, 0))


def test_choice_one_of_a_seed_is_not_choice_zero_of_the_next_seed():
    assert draws(choice(1234, 1)) != draws(choice(1235, 0))
    assert draws(choice(-1, 1)) != draws(choice(0, 0))


def test_seeded_choice_reproduces_regardless_of_batch_neighbours():
    torch.manual_seed(2)
    steps = [torch.randn(1, VOCAB) for _ in range(8)]

    def run(neighbours: int) -> list[int]:
        target = choice(99, 3)
        others = [choice(99, i) for i in range(neighbours)] + [seq(temperature=1.0)]
        tokens = []
        for row in steps:
            logits = torch.cat([torch.randn(len(others), VOCAB), row])
            tokens.append(Sampler()(logits, [*others, target]).token_ids[-1])
        return tokens

    assert run(0) == run(2) == run(5)


# -- seeded draws ---------------------------------------------------------------------------------


def test_seeded_draws_follow_the_distribution_over_seeds():
    """A seeded row draws its one uniform from its own generator: over many seeds its tokens follow the
    filtered distribution (here temperature 0.5 and top_p 0.8 over four live tokens: probabilities 0.657,
    0.242, 0.089, 0.012, so the nucleus is the first two, renormalised)."""
    logits = torch.full((1, VOCAB), -1e9)
    logits[0, :4] = torch.tensor([2.0, 1.5, 1.0, 0.0])
    expected = torch.tensor([torch.e, 1.0, 0.0, 0.0])
    expected /= expected.sum()
    tokens = [Sampler()(logits.clone(), [seq(temperature=0.5, top_p=0.8, seed=s)]).token_ids[0] for s in range(3000)]
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB)[:4].float() / len(tokens)
    assert torch.allclose(counts, expected, atol=0.03), (counts, expected)
    assert counts[2] == counts[3] == 0  # outside the nucleus


# -- top_k beyond the vocabulary ------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [VOCAB, VOCAB + 1, 2**63 - 1, 2**63, 2**64])
def test_top_k_beyond_the_vocabulary_is_off(top_k):
    torch.manual_seed(3)
    logits = torch.tensor([[0.0, 1.0, 2.0] + [-1e9] * (VOCAB - 3)]).repeat(2000, 1)
    rows = [seq(temperature=1.0) for _ in range(2000)]
    for s in rows:
        s.params.top_k = top_k  # past validation: the sampler copes with any integer
    out = Sampler()(logits, rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=VOCAB)[:3].float() / 2000
    assert torch.allclose(counts, logits[0, :3].softmax(-1), atol=0.04)


# -- logit_bias -----------------------------------------------------------------------------------


def test_logit_bias_plus_100_makes_greedy_pick_the_token():
    torch.manual_seed(4)
    logits = torch.randn(3, VOCAB)
    out = Sampler()(
        logits,
        [seq(temperature=0, logit_bias={17: 100.0}), seq(temperature=0), seq(temperature=0, logit_bias={3: 100})],
    )
    assert out.token_ids[0] == 17 and out.token_ids[2] == 3
    assert out.token_ids[1] == int(logits[1].argmax())  # a row without bias in the same batch


def test_logit_bias_minus_100_bans_the_token_greedy_and_sampled():
    logits = torch.zeros(256, VOCAB)
    logits[:, 5] = 8.0  # by far the likeliest token without the bias
    rows = [seq(temperature=1.0, logit_bias={5: -100.0}) for _ in range(128)]
    rows += [seq(temperature=1.0) for _ in range(127)] + [seq(temperature=0, logit_bias={5: -100})]
    out = Sampler()(logits, rows)
    assert 5 not in out.token_ids[:128] and out.token_ids[-1] != 5
    assert out.token_ids[128:255].count(5) > 100  # unbiased neighbours still pick it


def test_logit_bias_leaves_logprobs_of_the_raw_distribution():
    torch.manual_seed(5)
    logits = torch.randn(1, VOCAB)
    out = Sampler()(logits, [seq(temperature=0, logprobs=True, top_logprobs=1, logit_bias={9: 100.0})])
    raw = logits.log_softmax(-1)[0]
    assert out.token_ids == [9]
    assert out.logprobs[0][0] == pytest.approx(raw[9].item(), abs=1e-6)
    assert out.logprobs[0][1][0][0] == int(raw.argmax())


def test_logit_bias_does_not_change_the_callers_logits():
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    Sampler()(logits, [seq(temperature=0, logit_bias={1: 100.0}), seq(temperature=1.0, logit_bias={2: -50.0})])
    assert torch.equal(logits, before)


def test_greedy_rows_without_bias_or_penalties_take_the_fast_path(monkeypatch):
    logits = torch.randn(2, VOCAB)

    def no_clone(*args, **kwargs):
        raise AssertionError("the fast path must not copy the logits")

    monkeypatch.setattr(torch.Tensor, "clone", no_clone)
    out = Sampler()(logits, [seq(temperature=0), seq(temperature=0)])
    assert out.token_ids == logits.argmax(-1).tolist()


# -- device ---------------------------------------------------------------------------------------


def test_every_tensor_the_sampler_builds_is_on_the_logits_device(monkeypatch):
    """torch.tensor is wrapped to record calls without device=; the real tensors stay on CPU here."""
    calls = []
    real = torch.tensor

    def recording(*args, **kwargs):
        if "device" not in kwargs:
            calls.append(args[0] if args else kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", recording)
    logits = torch.randn(4, VOCAB)
    rows = [
        seq(output=(5, 5, 6), temperature=1.0, top_k=3, top_p=0.9, min_p=0.01, presence_penalty=0.5,
            frequency_penalty=0.5, repetition_penalty=1.2, logit_bias={1: 2.0}, seed=1),
        seq(temperature=0, logit_bias={2: 100.0}),
        seq(temperature=0.7),
        seq(temperature=0),
    ]
    Sampler()(logits, rows)
    assert calls == []


def test_top_p_zero_keeps_the_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, 1.0]])
    filter_logits(logits, torch.tensor([0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.isfinite(logits[0]).tolist() == [False, True, False]


# -- pinned details (each test kills mutants that the behavioural tests above let through) ---------


def test_choice_seeds_are_stable_across_releases():
    """A client's seed must give the same tokens after an upgrade: the derivation is pinned (SHA-256 of
    "seed,index", its first 8 bytes little-endian, cut to 63 bits)."""
    assert choice_seed(1234, 0) == 5003229038957807606
    assert choice_seed(-7, 3) == 2645659177270255018
    assert all(0 <= choice_seed(s, i) < 2**63 for s in range(200) for i in range(3))
    assert max(choice_seed(s, 0) for s in range(200)) >= 2**62  # the 63rd bit is used
    assert any(choice_seed(s, 0) % 2 for s in range(200))  # and the lowest


def test_repetition_penalty_on_a_small_positive_logit_and_an_id_past_the_vocabulary():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 4] = 0.5, -0.5
    # id VOCAB: a prompt token the (padded) logits have no column for is skipped, not an IndexError
    apply_penalties(logits, [0], [seq(prompt=(3, 4, VOCAB), repetition_penalty=2.0)])
    assert (logits[0, 3].item(), logits[0, 4].item()) == (0.25, -1.0)


def test_logit_bias_adds_to_the_logit_on_token_zero_and_skips_ids_past_the_vocabulary():
    logits = torch.full((2, VOCAB), 1.5, dtype=torch.float64)  # float64: the bias takes the logits' dtype
    apply_logit_bias(logits, [0, 1], [seq(logit_bias={0: 2.0, VOCAB: 5.0}), seq(logit_bias={7: -1.0})])
    assert logits[0, 0].item() == 3.5 and logits[1, 7].item() == 0.5  # added, not replaced
    assert (logits[0, 1:] == 1.5).all() and logits[1, 0].item() == 1.5


def test_min_tokens_masks_the_stop_tokens_until_enough_are_out():
    logits = torch.zeros(3, VOCAB)
    logits[:, 0], logits[:, 9] = 10.0, 5.0  # EOS (0) first, then 9
    early = seq(temperature=0, min_tokens=3)
    done = seq(output=(5, 6, 7), temperature=0, min_tokens=3)
    other = seq(temperature=0, min_tokens=3)
    early.min_tokens_stop_ids = (0, VOCAB)  # an id past the vocabulary is skipped
    done.min_tokens_stop_ids = (0,)
    other.min_tokens_stop_ids = (9,)
    out = Sampler()(logits, [early, done, other])
    assert out.token_ids == [9, 0, 0]
    assert logits[0, 0].item() == 10.0  # the caller's logits are untouched


def test_top_k_one_keeps_only_the_best_token():
    logits = torch.arange(VOCAB, dtype=torch.float32).unsqueeze(0)
    filter_logits(logits, torch.tensor([1]), torch.tensor([1.0]), torch.tensor([0.0]))
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [VOCAB - 1]
    out = Sampler()(torch.zeros(64, VOCAB).index_fill_(1, torch.tensor([7]), 1.0),
                    [seq(temperature=2.0, top_k=1) for _ in range(64)])
    assert set(out.token_ids) == {7}


def test_top_p_boundary_and_min_p_one():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])  # probabilities exactly 0.5, 0.5
    filter_logits(logits, torch.tensor([0]), torch.tensor([0.5]), torch.tensor([0.0]))
    assert torch.isfinite(logits[0]).sum().item() == 1  # the first token already holds top_p of the mass
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
    filter_logits(logits, torch.tensor([0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert torch.isfinite(logits[0]).tolist() == [True, False, False, False]  # min_p 1: only the top token


def test_low_temperature_sharpens_and_high_temperature_flattens():
    logits = torch.tensor([[0.0, 1.0]]).repeat(2000, 1)
    cold = Sampler()(logits, [seq(temperature=0.05) for _ in range(2000)]).token_ids
    assert cold.count(1) == 2000  # e^(1/0.05) : 1
    hot = Sampler()(logits, [seq(temperature=2.0) for _ in range(2000)]).token_ids
    assert 0.55 < hot.count(1) / 2000 < 0.70  # sigmoid(0.5) = 0.62; at temperature 1 it would be 0.73


def test_presence_and_frequency_penalties_without_generated_tokens_change_nothing():
    logits = torch.randn(1, VOCAB)
    before = logits.clone()
    apply_penalties(logits, [0], [seq(prompt=(4, 5), presence_penalty=1.5, frequency_penalty=0.5)])
    assert torch.equal(logits, before)  # the prompt is not penalised, and nothing was generated yet


def test_penalties_and_the_min_tokens_mask_work_in_the_logits_dtype():
    """The logits' dtype throughout: float64 logits are penalised in float64 (0.1 has no exact float32)."""
    logits = torch.zeros(2, VOCAB, dtype=torch.float64)
    apply_penalties(logits, [0], [seq(output=(5, 5, 6), presence_penalty=0.1, frequency_penalty=0.1)])
    assert logits[0, 5].item() == -(0.1 * 2 + 0.1) and logits[0, 6].item() == -(0.1 + 0.1)
    early = seq(min_tokens=2)
    early.min_tokens_stop_ids = (3,)
    mask_early_stops(logits, [1], [early])
    assert logits[1, 3].item() == float("-inf") and logits.dtype == torch.float64


@pytest.mark.parametrize("apply", [apply_penalties, apply_logit_bias, mask_early_stops])
def test_rows_and_sequences_that_do_not_line_up_are_a_loud_error(apply):
    """A caller bug (one more row than sequences) must fail, not penalise or mask the wrong rows."""
    s = seq(output=(5,), presence_penalty=1.0, logit_bias={5: 1.0}, min_tokens=3)
    s.min_tokens_stop_ids = (0,)
    with pytest.raises(ValueError, match="zip"):
        apply(torch.zeros(2, VOCAB), [0, 1], [s])
