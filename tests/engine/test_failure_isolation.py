"""One request's failure is its own: the batch and the loop go on; an engine failure makes it unhealthy.

The faults are injected (a detokenizer or sampler that raises for one request, ENGINE_TEST_FAULT): no
real component fails on demand, and these are the failures the engine must survive.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine import LLM, SamplingParams
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.failures import RequestFailedError, install_test_fault, is_fatal
from tests.engine.checkpoints import tiny_checkpoint

torch.set_num_threads(2)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def llm():
    return LLM(str(tiny_checkpoint("llama")), block_size=4, num_kv_blocks=128)


def run_all(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


def alone(llm, prompt) -> list[int]:
    return llm.generate(prompt, GREEDY)[0].outputs[0].token_ids


def test_a_detokenizer_failure_fails_its_request_and_the_batch_goes_on(llm):
    expected = {p: alone(llm, p) for p in ("Hello", "The quick", "Once upon")}
    engine = llm.engine
    for i, prompt in enumerate(expected):
        engine.add_request(f"r{i}", prompt, GREEDY)
    bad = engine.requests["r1"].detoks[0]

    def broken(token_id, check_stop=True):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    bad.add_token = broken
    finals = {}
    tokens = {"r0": [], "r2": []}
    while engine.has_unfinished():
        for out in engine.step():
            for delta in out.outputs:
                tokens[out.request_id] += delta.token_ids
            if out.finished:
                finals[out.request_id] = out
    assert finals["r1"].error and "UnicodeDecodeError" in finals["r1"].error
    assert finals["r0"].error is None and finals["r2"].error is None
    assert tokens["r0"] == expected["Hello"] and tokens["r2"] == expected["Once upon"]
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
    assert alone(llm, "Hello") == expected["Hello"]  # and the engine serves the next request


def test_a_sampling_failure_of_one_row_fails_that_request_alone(llm):
    expected = alone(llm, "Hello")
    engine = llm.engine
    sampler = engine.runner.sampler
    real = sampler.__class__.__call__

    def flaky(self, logits, seqs):
        if any(s.request_id == "bad" for s in seqs):
            raise IndexError("injected for one row")
        return real(self, logits, seqs)

    sampler.__class__ = type("FlakySampler", (sampler.__class__,), {"__call__": flaky})
    engine.add_request("good", "Hello", GREEDY)
    engine.add_request("bad", "The quick", GREEDY)
    finals = run_all(engine)
    assert "IndexError" in finals["bad"].error and finals["good"].error is None
    out = llm.generate("Hello", GREEDY)[0].outputs[0]
    assert out.token_ids == expected


def test_fatal_errors_are_the_device_and_memory_ones():
    assert is_fatal(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_fatal(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_fatal(MemoryError())
    assert not is_fatal(IndexError("index 5 is out of bounds"))
    assert not is_fatal(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"))


def test_a_fatal_sampling_error_is_not_swallowed(llm):
    engine = llm.engine

    def oom(logits, seqs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    engine.runner.sampler = oom
    engine.add_request("r", "Hello", GREEDY)
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()


async def test_an_engine_failure_makes_it_unhealthy_fails_requests_in_flight_and_calls_on_fatal(llm):
    died = asyncio.Event()
    loop = asyncio.get_running_loop()
    reasons = []

    def on_fatal(exc):
        reasons.append(exc)
        loop.call_soon_threadsafe(died.set)

    engine = AsyncEngine(llm.engine, on_fatal=on_fatal)
    install_test_fault(llm.engine, "fatal-after:3")
    engine.start()
    try:
        stream = engine.generate("r", llm.tokenizer.encode("Hello"), GREEDY)
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        await asyncio.wait_for(died.wait(), 10)
        assert not engine.healthy and "ENGINE_TEST_FAULT" in str(reasons[0])
        with pytest.raises(EngineDeadError, match="not running"):
            engine.generate("next", [1, 2], GREEDY)
    finally:
        engine.shutdown()


async def test_async_engine_hands_a_request_failure_to_that_request_only(llm):
    engine = AsyncEngine(llm.engine)
    engine.start()
    try:
        ids = llm.tokenizer.encode("Hello")
        good = engine.generate("good", ids, GREEDY)
        bad = engine.generate("bad", ids, SamplingParams(temperature=0, max_tokens=6, stop=["x"]))
        original = llm.engine.finish_reason

        def failing(seq, token, detok):
            if seq.request_id == "bad":
                raise ValueError("injected stop-check failure")
            return original(seq, token, detok)

        llm.engine.finish_reason = failing

        async def drain(stream):
            return [out async for out in stream]

        good_out, bad_out = await asyncio.gather(drain(good), drain(bad), return_exceptions=True)
        assert isinstance(bad_out, RequestFailedError) and "injected" in str(bad_out)
        assert good_out[-1].finished and sum(len(d.token_ids) for o in good_out for d in o.outputs) == 6
        assert engine.healthy
    finally:
        engine.shutdown()


async def test_on_own_thread_builds_and_steps_the_engine_on_one_thread_and_raises_what_building_raised():
    """`engine serve`'s AsyncEngine: the model is loaded on the thread that steps it (one OpenMP team: a
    model loaded on the main thread and stepped on another ran at half speed on 2 cores), never the
    caller's; a build failure (a bad model file) is raised to the caller, with no loop left running."""
    import threading

    from engine.loader import ModelLoadError

    built_on, stepped_on = [], set()

    def make_engine():
        built_on.append(threading.current_thread())
        engine = LLM(str(tiny_checkpoint("llama")), block_size=4, num_kv_blocks=128).engine
        step = engine.step

        def recording_step():
            stepped_on.add(threading.current_thread())
            return step()

        engine.step = recording_step
        return engine

    engine = AsyncEngine.on_own_thread(make_engine)
    try:
        assert engine.healthy
        outputs = [out async for out in engine.generate("r", [1, 2, 3], GREEDY)]
        tokens = [t for out in outputs for t in out.outputs[0].token_ids]  # each output carries its new tokens
        assert outputs[-1].finished and len(tokens) == GREEDY.max_tokens
    finally:
        engine.shutdown()
    assert stepped_on == set(built_on) and built_on[0] is not threading.current_thread()
    assert not built_on[0].is_alive()

    def broken():
        raise ModelLoadError("model.gguf: unreadable GGUF file")

    before = threading.active_count()
    with pytest.raises(ModelLoadError, match="unreadable"):
        AsyncEngine.on_own_thread(broken)
    assert threading.active_count() == before
