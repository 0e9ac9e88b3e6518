"""Scheduler: token budget, chunked prefill, decodes keep flowing, preemption of the newest, abort, limits."""

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus

BS = 4


def make_scheduler(num_blocks=64, budget=32, max_num_seqs=8, max_model_len=1024):
    return Scheduler(
        BlockManager(num_blocks, BS),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_model_len,
    )


def make_seq(n, request_id="r", max_tokens=100, **params):
    return Sequence(request_id, list(range(1, n + 1)), SamplingParams(**params), max_tokens=max_tokens)


def run_step(sched: Scheduler, token=7):
    """Schedule one step and pretend the model sampled `token` for every sequence that reached its end."""
    batch = sched.schedule()
    plan = {s.seq_id: n for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}
    sampled = {
        s.seq_id: token
        for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True)
        if s.num_computed_tokens + n == s.num_tokens
    }
    sched.update(batch, sampled)
    return batch, plan


def test_budget_bounds_each_step_and_long_prompt_is_chunked():
    sched = make_scheduler(budget=16)
    seq = make_seq(40)
    sched.add(seq)
    chunks = []
    while seq.num_output_tokens == 0:
        batch, plan = run_step(sched)
        assert batch.num_tokens <= 16
        chunks.append(plan[seq.seq_id])
    assert chunks == [16, 16, 8]
    assert seq.num_computed_tokens == 40 and seq.num_tokens == 41


def test_decodes_keep_flowing_during_a_chunked_prefill():
    sched = make_scheduler(budget=8)
    short = make_seq(3, "short")
    sched.add(short)
    run_step(sched)  # short is prefilled, now decoding
    long = make_seq(30, "long")
    sched.add(long)
    for _ in range(4):
        batch, plan = run_step(sched)
        assert plan[short.seq_id] == 1  # one decode token every step
        assert plan[long.seq_id] == 7  # the rest of the budget goes to the prefill chunk
    assert short.num_output_tokens == 5


def test_max_num_seqs_limits_the_running_batch():
    sched = make_scheduler(max_num_seqs=2)
    for i in range(3):
        sched.add(make_seq(4, f"r{i}"))
    batch, _ = run_step(sched)
    assert len(batch.seqs) == 2 and len(sched.waiting) == 1


def test_preempts_newest_when_blocks_run_out_and_recomputes_it_later():
    sched = make_scheduler(num_blocks=4, budget=64)
    old, new = make_seq(4, "old", ignore_eos=True), make_seq(4, "new", ignore_eos=True)
    sched.add(old)
    sched.add(new)
    run_step(sched)  # both prefilled: 2 blocks used; each now holds 5 tokens
    batch, plan = run_step(sched)  # each decode needs a second block: 4 blocks used
    assert set(plan) == {old.seq_id, new.seq_id}
    for _ in range(4):
        run_step(sched)  # positions 5..7 fit; position 8 needs a third block each: only old gets one
    assert new.status is SequenceStatus.WAITING and sched.waiting[0] is new
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert sched.num_preemptions == 1
    assert old.status is SequenceStatus.RUNNING
    tokens_before, first_scheduled = list(new.token_ids), new.first_scheduled_time
    assert new.num_cached_tokens == 0 and first_scheduled is not None
    sched.finish(old, "stop")
    batch, plan = run_step(sched)
    assert plan[new.seq_id] < len(tokens_before)  # recomputed, mostly from the prefix cache
    assert new.token_ids[: len(tokens_before)] == tokens_before
    # The recompute's cache hits are not the prompt's: cached_tokens and the queue wait stay the first admission's.
    assert new.num_cached_tokens == 0 and new.first_scheduled_time == first_scheduled


def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(10)
    sched.add(seq)
    run_step(sched)
    assert sched.block_manager.num_free_blocks == 5
    sched.finish(seq, "abort")
    assert sched.block_manager.num_free_blocks == 8
    assert not sched.has_unfinished() and seq.finish_reason == "abort"


def test_abort_of_a_waiting_sequence():
    sched = make_scheduler()
    seq = make_seq(5)
    sched.add(seq)
    sched.finish(seq, "abort")
    assert not sched.waiting and not sched.schedule()


def test_prompt_that_can_never_fit_is_rejected():
    sched = make_scheduler(num_blocks=4, max_model_len=1024)  # the pool holds 16 tokens
    assert sched.max_model_len == 16
    assert sched.prompt_fits(15)
    assert not sched.prompt_fits(16)
    small = make_scheduler(num_blocks=64, max_model_len=20)
    assert not small.prompt_fits(20)


def test_update_appends_tokens_and_leaves_finishing_to_the_engine():
    """The scheduler only records tokens, whatever they are (it knows no EOS); LLMEngine.finish_reason is
    the one place that finishes."""
    sched = make_scheduler()
    a = make_seq(3, "a", max_tokens=1)
    sched.add(a)
    run_step(sched, token=7)
    assert a.status is SequenceStatus.RUNNING and a.token_ids[-1] == 7 and a.finish_reason is None
    sched.finish(a, "stop")
    assert a.finish_reason == "stop" and not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_admission_uses_prefix_cache_and_records_cached_tokens():
    sched = make_scheduler()
    first = make_seq(13, "first")
    sched.add(first)
    run_step(sched)
    second = make_seq(13, "second")
    sched.add(second)
    batch, plan = run_step(sched)
    assert second.num_cached_tokens == 12 and plan[second.seq_id] == 1


def test_identical_prompts_in_one_step_compute_the_prefix_once():
    sched = make_scheduler(num_blocks=64, budget=64)
    seqs = [Sequence("r", list(range(1, 14)), SamplingParams(n=4), max_tokens=10, index=i) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch, plan = run_step(sched)
    assert len(batch.seqs) == 4
    assert [plan[s.seq_id] for s in seqs] == [13, 1, 1, 1]  # the 3 full blocks are computed once
    assert [s.num_cached_tokens for s in seqs] == [0, 12, 12, 12]
    assert all(s.block_table[:3] == seqs[0].block_table[:3] for s in seqs)
    bm = sched.block_manager
    assert bm.num_free_blocks == 64 - (4 + 3)  # one prompt's blocks + one last block per other choice
    assert bm.prefix_queries == 4 * 13 and bm.prefix_hits == 3 * 12


def test_prefix_stats_do_not_count_a_lookup_whose_admission_failed():
    sched = make_scheduler(num_blocks=5, budget=64)
    first, second = make_seq(13, "first"), make_seq(13, "second")
    big = Sequence("big", list(range(50, 67)), SamplingParams(), max_tokens=10)  # 5 blocks: cannot fit now
    sched.add(first)
    sched.add(big)
    sched.add(second)
    batch, plan = run_step(sched)
    assert list(plan) == [first.seq_id] and sched.waiting[0] is big
    bm = sched.block_manager
    assert bm.prefix_queries == 13 and bm.prefix_hits == 0



def test_prefix_hits_of_a_lookup_whose_admission_failed_are_rolled_back():
    sched = make_scheduler(num_blocks=5, budget=64)
    first = make_seq(13, "first")  # 4 blocks; its 3 full ones are cached at allocation
    big = Sequence("big", list(range(1, 13)) + list(range(50, 71)), SamplingParams(), max_tokens=10)
    sched.add(first)
    sched.add(big)
    batch, plan = run_step(sched)
    bm = sched.block_manager
    assert list(plan) == [first.seq_id] and sched.waiting[0] is big  # 6 more blocks do not fit in 1
    assert (bm.prefix_queries, bm.prefix_hits) == (13, 0)
    assert bm.find_cached_blocks(big) == first.block_table[:3]  # the lookup it made did hit 12 tokens

def test_several_admissions_share_one_budget_and_a_spent_budget_admits_nobody():
    sched = make_scheduler(budget=8)
    a, b, c = (make_seq(3, name) for name in "abc")
    for s in (a, b, c):
        sched.add(s)
    batch, plan = run_step(sched)
    assert [plan[s.seq_id] for s in (a, b, c)] == [3, 3, 2] and batch.num_tokens == 8
    two = make_scheduler(budget=2)
    x, y, z = (make_seq(1, name) for name in "xyz")
    for s in (x, y, z):
        two.add(s)
    assert two.has_unfinished()  # waiting only
    batch, plan = run_step(two)
    assert list(plan) == [x.seq_id, y.seq_id] and batch  # the last token of the budget admits y
    assert z.status is SequenceStatus.WAITING and list(two.waiting) == [z]  # not admitted with 0 tokens


def test_the_last_token_of_the_budget_goes_to_the_last_running_sequence():
    sched = make_scheduler(budget=3)
    seqs = [make_seq(1, name) for name in "abc"]
    for s in seqs:
        sched.add(s)
    run_step(sched)
    assert not sched.waiting and sched.has_unfinished()  # running only
    batch, plan = run_step(sched)
    assert [plan.get(s.seq_id) for s in seqs] == [1, 1, 1]


def test_a_prompt_that_fits_only_with_its_cached_prefix_is_admitted():
    sched = make_scheduler(num_blocks=5, budget=64)
    first = make_seq(13, "first")  # 4 blocks, 3 of them full and cached
    sched.add(first)
    run_step(sched)
    second = make_seq(13, "second")  # 3 cached blocks + 1 new: fits the 1 free block
    sched.add(second)
    batch, plan = run_step(sched)
    assert plan[second.seq_id] == 1 and second.num_cached_tokens == 12


def test_cached_blocks_back_in_the_free_pool_count_against_it_at_admission():
    """A finished sequence's cached blocks sit in the free pool: taking them back consumes free blocks."""
    sched = make_scheduler(num_blocks=5, budget=64)
    first = make_seq(13, "first")
    sched.add(first)
    run_step(sched)
    sched.finish(first, "stop")  # its 3 full blocks stay cached, evictable
    other = Sequence("other", list(range(100, 108)), SamplingParams(), max_tokens=10)
    sched.add(other)
    run_step(sched)  # 2 blocks for it: 3 free, all of them first's cached blocks
    second = make_seq(13, "second")
    sched.add(second)
    batch, plan = run_step(sched)  # other's decode takes a block; second would need its cached ones plus one
    assert list(plan) == [other.seq_id] and second.status is SequenceStatus.WAITING
    sched.finish(other, "stop")
    batch, plan = run_step(sched)
    assert second.status is SequenceStatus.RUNNING and plan[second.seq_id] < 13  # now, from the cache


def test_a_prompt_that_wants_prompt_logprobs_is_computed_in_full_despite_the_cache():
    sched = make_scheduler()
    first = make_seq(13, "first")
    sched.add(first)
    run_step(sched)
    scored = make_seq(13, "scored", prompt_logprobs=1)
    sched.add(scored)
    batch, plan = run_step(sched)
    assert plan[scored.seq_id] == 13 and scored.num_cached_tokens == 0


def test_update_skips_an_aborted_sequence_and_a_failed_sample_but_not_the_rest_of_the_batch():
    sched = make_scheduler()
    a, b, c, d = (make_seq(2, name) for name in "abcd")
    for s in (a, b, c, d):
        sched.add(s)
    batch = sched.schedule()
    sched.finish(b, "abort")  # the client left while the step ran
    grown = sched.update(batch, {a.seq_id: 5, b.seq_id: 5, d.seq_id: 6})  # c's sample failed
    assert grown == [a, d]
    assert (a.token_ids[-1], d.token_ids[-1], c.num_tokens) == (5, 6, 2)
    assert [s.num_computed_tokens for s in (a, c, d)] == [2, 2, 2]


def test_two_preemptions_in_one_step_are_both_counted_and_requeued_oldest_first():
    sched = make_scheduler(num_blocks=3, budget=64)
    a, b, c = (make_seq(4, name, ignore_eos=True) for name in "abc")
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)  # three full blocks: the pool is used up, each sequence now holds 5 tokens
    batch, plan = run_step(sched)  # a's decode needs a block: c goes, then b (no block left for it either)
    assert list(plan) == [a.seq_id] and sched.num_preemptions == 2
    assert list(sched.waiting) == [b, c] and (b.status, c.status) == (SequenceStatus.WAITING,) * 2


def test_finishing_a_finished_sequence_again_changes_nothing():
    """An abort that arrives just after the sequence finished (the client left at its last token)."""
    sched = make_scheduler()
    seq = make_seq(3)
    sched.add(seq)
    run_step(sched)
    sched.finish(seq, "stop")
    sched.finish(seq, "abort")
    assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "stop"
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_a_batch_whose_token_counts_do_not_line_up_is_a_loud_error():
    sched = make_scheduler()
    seq = make_seq(3)
    sched.add(seq)
    batch = sched.schedule()
    batch.num_new_tokens.append(1)  # a bug elsewhere: one count too many
    with pytest.raises(ValueError, match="zip"):
        sched.update(batch, {seq.seq_id: 7})


def test_identical_prompts_in_one_step_give_the_same_greedy_tokens_as_alone():
    import torch

    from engine import LLM
    from tests.engine.checkpoints import tiny_checkpoint

    torch.set_num_threads(2)
    path = str(tiny_checkpoint("llama"))
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = list(range(10, 31))  # 21 tokens: 5 full blocks of 4 + 1
    alone = LLM(path, block_size=4, num_kv_blocks=64, enable_prefix_caching=False).generate([prompt], greedy)
    expected = alone[0].outputs[0].token_ids

    llm = LLM(path, block_size=4, num_kv_blocks=64)
    scheduler = llm.engine.scheduler
    batches = []
    schedule = scheduler.schedule

    def recording_schedule():
        batch = schedule()
        batches.append(list(batch.num_new_tokens))
        return batch

    scheduler.schedule = recording_schedule
    n4 = SamplingParams(n=4, temperature=0, max_tokens=8, ignore_eos=True)
    outs = llm.generate([prompt, prompt], [n4, greedy])  # 5 sequences with one prompt, all in step one
    assert batches[0] == [21, 1, 1, 1, 1]  # the prefix is computed once
    assert [c.token_ids for out in outs for c in out.outputs] == [expected] * 5
    assert outs[0].num_cached_tokens == 0 and outs[1].num_cached_tokens == 20
