"""Batch invariance: each greedy request gives the same tokens alone and in a batch of 16 prompts of
different lengths, with chunked prefill, after preemption, and when its prefix came from the cache."""

import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.checkpoints import tiny_checkpoint

torch.set_num_threads(2)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def make_prompts(vocab: int, count: int = 16, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(20)]  # some prompts share a prefix
    prompts = []
    for i in range(count):
        length = 3 + 4 * i  # 3 .. 63 tokens
        body = [rng.randrange(3, vocab) for _ in range(length)]
        prompts.append((shared + body)[:length] if i % 3 == 0 else body)
    return prompts


def tokens_of(outputs) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in outputs]


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request):
    path = str(tiny_checkpoint(request.param))
    alone_llm = LLM(path, block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    prompts = make_prompts(alone_llm.engine.loaded.spec.vocab_size)
    alone = [tokens_of(alone_llm.generate([p], GREEDY))[0] for p in prompts]
    assert all(len(t) == GREEDY.max_tokens for t in alone)
    return path, prompts, alone


def test_batch_of_16(setup):
    path, prompts, alone = setup
    llm = LLM(path, block_size=4, num_kv_blocks=512, enable_prefix_caching=False)
    assert tokens_of(llm.generate(prompts, GREEDY)) == alone


def test_chunked_prefill(setup):
    path, prompts, alone = setup
    llm = LLM(path, block_size=4, num_kv_blocks=512, max_num_batched_tokens=7, enable_prefix_caching=False)
    assert tokens_of(llm.generate(prompts, GREEDY)) == alone


def test_after_preemption(setup):
    path, prompts, alone = setup
    # 40 blocks of 4 tokens cannot hold 16 sequences of up to 73 tokens: the newest get preempted.
    llm = LLM(path, block_size=4, num_kv_blocks=40)
    assert tokens_of(llm.generate(prompts, GREEDY)) == alone
    assert llm.engine.scheduler.num_preemptions > 0


def test_prefix_from_the_cache(setup):
    path, prompts, alone = setup
    llm = LLM(path, block_size=4, num_kv_blocks=512)
    llm.generate(prompts[::2], GREEDY)  # warm the cache with half of them
    outputs = llm.generate(prompts, GREEDY)
    assert tokens_of(outputs) == alone
    cached = [out.num_cached_tokens for out in outputs]
    assert all(c > 0 for c in cached[2::2])  # re-sent prompts hit (all but their last block)
    assert sum(cached) > 0.5 * sum(len(p) for p in prompts[::2])
