"""LLMEngine / LLM on a tiny checkpoint: n > 1, seeds, stop strings, stop tokens, abort, logprobs, limits."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.llm_engine import ContextLengthError
from engine.sampling_params import SamplingParamError
from engine.sequence import Sequence
from tests.engine.checkpoints import tiny_checkpoint

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(tiny_checkpoint("llama")), block_size=4, num_kv_blocks=128)


def test_generate_keeps_prompt_order_and_counts(llm):
    outs = llm.generate(
        ["The quick brown fox", "Hello"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    )
    assert [o.num_prompt_tokens for o in outs] == [
        len(llm.tokenizer.encode(p)) for p in ["The quick brown fox", "Hello"]
    ]
    for out in outs:
        choice = out.outputs[0]
        assert out.finished and choice.finish_reason == "length" and len(choice.token_ids) == 6
        assert choice.text == llm.tokenizer.decode(choice.token_ids)
        assert out.num_output_tokens == 6


def test_n_choices_with_a_seed_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = llm.generate("Tell me a story", params)[0]
    assert [c.index for c in first.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    assert first.num_output_tokens == 32
    # Same seed, other requests in the batch: the same choices.
    noisy = llm.generate(
        ["Tell me a story", "noise one", "noise two and more"],
        [
            params,
            SamplingParams(temperature=1.0, max_tokens=5),
            SamplingParams(temperature=1.0, max_tokens=9),
        ],
    )[0]
    assert [c.token_ids for c in noisy.outputs] == [c.token_ids for c in first.outputs]


def test_stop_string_truncates_text_and_finishes(llm):
    free = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[
        0
    ].outputs[0]
    stop = free.text[3:6]
    assert stop.strip(), "the continuation must have text to stop on"
    out = llm.generate(
        "The quick", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop])
    )
    choice = out[0].outputs[0]
    assert choice.finish_reason == "stop" and choice.text == free.text[: free.text.index(stop)]
    assert stop not in choice.text


def test_stop_token_ids_finish_without_their_text(llm):
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[2]
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]))
    choice = out[0].outputs[0]
    first_stop = free.token_ids.index(stop_id)
    assert choice.finish_reason == "stop" and choice.token_ids == free.token_ids[: first_stop + 1]
    assert choice.text == llm.tokenizer.decode(free.token_ids[:first_stop])


def test_finish_reasons_are_decided_in_one_place(llm):
    """EOS and stop ids stop (unless ignore_eos), max_tokens and the context make "length"."""
    engine = llm.engine
    eos = next(iter(engine.eos_token_ids))

    def decide(token, **params):
        params = SamplingParams(**{"max_tokens": 5, **params})
        seq = Sequence("r", [3, 4, 5], params, engine.max_tokens_per_choice(3, params))
        seq.token_ids.append(token)
        return engine.finish_reason(seq, token, IncrementalDetokenizer(engine.tokenizer, [3, 4, 5], params))

    assert decide(eos) == "stop"
    assert decide(eos, ignore_eos=True) is None
    assert decide(9, stop_token_ids=[9]) == "stop"
    assert decide(9, max_tokens=1) == "length"
    assert decide(9) is None


def test_stop_string_completed_by_the_last_allowed_token_is_stop_not_length(llm):
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    last = llm.tokenizer.decode(free.token_ids[-1:])
    stop = next(free.text[-k:] for k in range(1, len(free.text) + 1)
                if free.text.find(free.text[-k:]) == len(free.text) - k and free.text[-k:].strip())
    assert free.finish_reason == "length" and stop and last
    out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop=[stop]))
    choice = out[0].outputs[0]
    assert choice.finish_reason == "stop" and choice.text == free.text[: -len(stop)]
    assert len(choice.token_ids) == 8


def test_logprobs(llm):
    out = llm.generate(
        "Hello", SamplingParams(temperature=0, max_tokens=3, logprobs=True, top_logprobs=2, ignore_eos=True)
    )[0].outputs[0]
    assert len(out.logprobs) == 3
    for lp, token in zip(out.logprobs, out.token_ids, strict=True):
        assert lp.token_id == token and lp.logprob <= 0 and len(lp.top) == 2
        assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)


def test_abort_frees_blocks_immediately(llm):
    engine = llm.engine
    free_before = engine.scheduler.block_manager.num_free_blocks
    engine.add_request(
        "to-abort", "The quick brown fox jumps", SamplingParams(max_tokens=50, ignore_eos=True)
    )
    engine.step()
    engine.step()
    assert engine.scheduler.block_manager.num_free_blocks < free_before
    engine.abort("to-abort")
    assert engine.scheduler.block_manager.num_free_blocks == free_before
    assert not engine.has_unfinished() and "to-abort" not in engine.requests


def test_prompt_over_the_context_is_rejected_up_front(llm):
    limit = llm.engine.scheduler.max_model_len
    with pytest.raises(ContextLengthError) as info:
        llm.engine.add_request("long", [5] * limit, SamplingParams())
    assert "maximum context length" in str(info.value)
    with pytest.raises(ContextLengthError) as info:
        llm.engine.add_request("long2", [5, 6, 7], SamplingParams(max_tokens=limit))
    assert info.value.param == "max_tokens"
    with pytest.raises(SamplingParamError):
        llm.engine.add_request("bad", [10**6], SamplingParams())
    assert not llm.engine.has_unfinished()


def test_a_prompt_that_fills_the_pool_is_rejected():
    small = LLM(str(tiny_checkpoint("llama")), block_size=4, num_kv_blocks=8)  # 32 tokens in all
    assert small.engine.scheduler.max_model_len == 32
    with pytest.raises(ContextLengthError):
        small.engine.add_request("x", list(range(3, 35)), SamplingParams())
    out = small.generate(
        [list(range(3, 30))], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    )[0]
    assert out.outputs[0].finish_reason == "length" and out.num_prompt_tokens + out.num_output_tokens == 32


def test_min_tokens_masks_stop_tokens_until_reached(llm):
    """A stop token the logit bias makes the only choice is held off for min_tokens tokens, then stops."""
    free = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0].outputs[0]
    forced = (free.token_ids[0] + 7) % llm.engine.loaded.spec.vocab_size
    params = dict(temperature=0, max_tokens=8, logit_bias={forced: 100}, stop_token_ids=[forced])
    eager = llm.generate("Hello", SamplingParams(**params))[0].outputs[0]
    assert eager.token_ids == [forced] and eager.finish_reason == "stop"  # the premise
    choice = llm.generate("Hello", SamplingParams(**params, min_tokens=3))[0].outputs[0]
    assert choice.finish_reason == "stop" and len(choice.token_ids) == 4
    assert forced not in choice.token_ids[:3] and choice.token_ids[3] == forced


def test_min_tokens_holds_off_eos(llm):
    eos = next(iter(llm.engine.eos_token_ids))
    params = dict(temperature=0, max_tokens=8, logit_bias={eos: 100})
    assert len(llm.generate("Hello", SamplingParams(**params))[0].outputs[0].token_ids) == 1  # the premise
    choice = llm.generate("Hello", SamplingParams(**params, min_tokens=2))[0].outputs[0]
    assert choice.finish_reason == "stop" and len(choice.token_ids) == 3 and choice.token_ids[2] == eos
    # with ignore_eos nothing is masked or stops: the bias wins every step
    kept = llm.generate("Hello", SamplingParams(**params, min_tokens=2, ignore_eos=True))[0].outputs[0]
    assert kept.finish_reason == "length" and kept.token_ids == [eos] * 8


def test_min_tokens_ignores_stop_strings_that_end_in_the_first_tokens(llm):
    free = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop = free.text[:2]
    assert stop.strip() and free.text.find(stop) == 0  # without min_tokens it stops at once
    for m in (2, 5):
        detok = IncrementalDetokenizer(llm.tokenizer, llm.tokenizer.encode("The quick"), SamplingParams())
        for token in free.token_ids[:m]:
            detok.add_token(token)
        before = len(detok.text)  # the (whole-character) text of the first m tokens
        later = free.text.find(stop, max(0, before - len(stop) + 1))  # the first occurrence ending after them
        choice = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                          stop=[stop], min_tokens=m))[0].outputs[0]
        if later < 0:
            assert choice.finish_reason == "length" and choice.text == free.text, (m, free, choice)
        else:
            assert choice.finish_reason == "stop" and choice.text == free.text[:later]


def test_include_stop_str_in_output_keeps_the_matched_stop_string(llm):
    free = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    stop = free.text[3:6]
    out = llm.generate("The quick", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["zzzz", stop],
                                                   include_stop_str_in_output=True))[0].outputs[0]
    end = free.text.index(stop) + len(stop)
    assert out.finish_reason == "stop" and out.text == free.text[:end] and out.text.endswith(stop)


def test_finish_reason_ignores_stops_during_min_tokens(llm):
    engine = llm.engine
    eos = next(iter(engine.eos_token_ids))

    def decide(outputs, token, **params):
        params = SamplingParams(**{"max_tokens": 5, **params})
        seq = Sequence("r", [3, 4, 5], params, engine.max_tokens_per_choice(3, params))
        seq.token_ids += [7] * (outputs - 1) + [token]
        return engine.finish_reason(seq, token, IncrementalDetokenizer(engine.tokenizer, [3, 4, 5], params))

    assert decide(2, eos, min_tokens=2) is None and decide(3, eos, min_tokens=2) == "stop"
    assert decide(1, 9, stop_token_ids=[9], min_tokens=1) is None
    assert decide(2, 9, stop_token_ids=[9], min_tokens=1) == "stop"
    assert decide(5, 9, min_tokens=5) == "length"  # max_tokens still ends it


def test_min_tokens_is_validated_against_max_tokens_and_the_context(llm):
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert err.value.param == "min_tokens"
    with pytest.raises(SamplingParamError) as err:
        SamplingParams(min_tokens=-1)
    assert err.value.param == "min_tokens"
    limit = llm.engine.scheduler.max_model_len
    with pytest.raises(SamplingParamError) as err:
        llm.engine.check_prompt([3, 4, 5], SamplingParams(min_tokens=limit))
    assert err.value.param == "min_tokens"
