"""Prompt logprobs (SamplingParams.prompt_logprobs): the logprob, rank and top alternatives of every prompt
token, equal to transformers' on the same weights, whatever the chunking, the prefix cache, preemption or
the batch neighbours."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.checkpoints import load_reference, tiny_checkpoint

torch.set_num_threads(2)

PROMPT = "Continuous batching lets requests join and leave the batch at every step; prefix caching reuses blocks."


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def reference(path):
    return load_reference(path)


def expected(reference, ids: list[int]) -> torch.Tensor:
    """transformers' log-softmax of the distribution of each prompt token after the first: [len - 1, vocab]."""
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0].float()
    return logits.log_softmax(-1)[:-1]


def check(entries, ids: list[int], reference, k: int) -> None:
    assert entries[0] is None and len(entries) == len(ids)
    ref = expected(reference, ids)
    for i, entry in enumerate(entries[1:]):
        row = ref[i]
        assert entry.token_id == ids[i + 1]
        assert entry.logprob == pytest.approx(float(row[ids[i + 1]]), abs=1e-4)
        assert entry.rank == int((row > row[ids[i + 1]]).sum()) + 1
        top_ids, top_vals = zip(*entry.top, strict=True) if k else ((), ())
        assert list(top_ids) == row.topk(k).indices.tolist()
        assert list(top_vals) == pytest.approx(row.topk(k).values.tolist(), abs=1e-4)


@pytest.mark.parametrize("chunk", [None, 7])
def test_prompt_logprobs_match_transformers(path, reference, chunk):
    """Whole-prompt prefill and a prefill in chunks of 7 tokens (budget per step) give the same values."""
    config = {"max_num_batched_tokens": chunk} if chunk else {}
    llm = LLM(str(path), block_size=4, num_kv_blocks=128, **config)
    ids = llm.tokenizer.encode(PROMPT)
    assert len(ids) > 20
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4))
    check(out.prompt_logprobs, ids, reference, 4)
    (zero,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    check(zero.prompt_logprobs, ids, reference, 0)


def test_not_computed_unless_asked(path):
    llm = LLM(str(path), block_size=4, num_kv_blocks=128)
    (out,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))
    assert out.prompt_logprobs is None


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(path, reference):
    """The prompt is in the prefix cache, yet its logprobs need every position's hidden state: the first
    choice computes it in full (no cached tokens reported); the other choices still reuse its blocks."""
    llm = LLM(str(path), block_size=4, num_kv_blocks=128)
    ids = llm.tokenizer.encode(PROMPT)
    (warm,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))
    (again,) = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))
    assert again.num_cached_tokens > 0  # the cache does hold it
    hits = llm.engine.scheduler.block_manager.prefix_hits
    (out,) = llm.generate(PROMPT, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=2, prompt_logprobs=2))
    assert out.num_cached_tokens == 0
    check(out.prompt_logprobs, ids, reference, 2)
    assert len(out.outputs) == 3
    # choices 1 and 2 took the prompt's full blocks from the cache
    assert llm.engine.scheduler.block_manager.prefix_hits - hits == 2 * ((len(ids) - 1) // 4) * 4
    del warm


def test_preemption_does_not_repeat_or_lose_entries(path, reference):
    """A long prompt prefilled in chunks of 8 tokens beside a growing answer, in a pool too small for
    both: it is preempted halfway through its prefill and recomputed from the start later; its prompt
    logprobs are still one per prompt token, equal to the reference."""
    llm = LLM(str(path), block_size=4, num_kv_blocks=26, max_num_batched_tokens=8)
    long_prompt = " ".join([PROMPT] * 2)
    ids = llm.tokenizer.encode(long_prompt)
    first = len(llm.tokenizer.encode(PROMPT))
    assert (first + len(ids)) // 4 > 26 > len(ids) // 4 + 2  # not both at once; the long one alone fits
    outs = llm.generate([PROMPT, long_prompt], [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2)])
    assert llm.engine.scheduler.num_preemptions > 0
    check(outs[0].prompt_logprobs, llm.tokenizer.encode(PROMPT), reference, 1)
    check(outs[1].prompt_logprobs, ids, reference, 2)


def test_a_failure_fails_only_its_request(path, monkeypatch):
    llm = LLM(str(path), block_size=4, num_kv_blocks=128)
    runner = llm.engine.runner
    real = runner._token_logprobs

    def failing(hidden, targets, k, **kw):
        if k == 3:
            raise RuntimeError("prompt logprobs broke")
        return real(hidden, targets, k, **kw)

    monkeypatch.setattr(runner, "_token_logprobs", failing)
    engine = llm.engine
    engine.add_request("bad", PROMPT, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=3))
    engine.add_request("good", PROMPT, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1))
    engine.add_request("plain", "Hello there", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    finished = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "prompt logprobs broke" in finished["bad"].error
    assert finished["good"].error is None and finished["plain"].error is None
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
