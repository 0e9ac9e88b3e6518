"""Tensor parallelism on the CPU (two ranks over gloo) gives the logits and greedy tokens of one rank, shards
quantized GGUF weights on their block boundaries, and refuses what it cannot split with the option named.

The engine tests run rank 0 in this process and rank 1 as the worker process the engine spawns
(engine/tp_workers.py); every logits tensor the engine samples from is recorded at both sizes and compared
step by step. The server tests are in test_tensor_parallel_server.py.
"""

from __future__ import annotations

import asyncio
import threading

import gguf
import numpy as np
import pytest
import torch

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.distributed import TensorParallel
from engine.layers.parallel import RowParallelLinear
from engine.llm_engine import LLMEngine
from engine.loader import ModelLoadError, build_model
from engine.models.llama import LlamaConfig
from engine.quant import GGUFTensor, QuantConfig
from engine.sampling_params import SamplingParams
from tests.engine.checkpoints import tiny_checkpoint, write_tiny_gguf

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. Paged attention reads keys",
    "What is the capital of France?",
    "Continuous batching lets requests join and leave the batch at every step",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Each rank computes on one thread (the engine sets it from torch_threads); restored afterwards."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def make_engine(model: str, tp: int, **config) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, num_kv_blocks=64, block_size=4, max_num_batched_tokens=24,
                                  torch_threads=1, tensor_parallel_size=tp, **config), metrics=False)


def run(engine: LLMEngine) -> tuple[dict[str, list[int]], list[torch.Tensor], list]:
    """Greedy generation of PROMPTS (one of them with prompt logprobs), then close the engine: (tokens per
    request, every logits tensor sampled from, in step order, prompt logprobs of request 0)."""
    sample = engine.runner.sample
    try:
        logits_seen: list[torch.Tensor] = []
        rows_seen: dict[str, list[torch.Tensor]] = {}

        def recording(logits, seqs):
            logits_seen.append(logits.clone())
            for seq, row in zip(seqs, logits, strict=True):
                rows_seen.setdefault(seq.request_id, []).append(row.float().clone())
            return sample(logits, seqs)

        engine.runner.sample = recording
        for i, prompt in enumerate(PROMPTS):  # chunked prefills (24-token budget), then mixed and decode steps
            engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                              prompt_logprobs=2 if i == 0 else None))
        tokens: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
        prompt_logprobs = None
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None
                tokens[out.request_id] += [t for d in out.outputs for t in d.token_ids]
                prompt_logprobs = prompt_logprobs or out.prompt_logprobs
        engine.rows_seen = rows_seen  # each request's sampled logits rows, in its token order
        return tokens, logits_seen, prompt_logprobs
    finally:
        engine.close()


def compare(one, two, tolerance: float) -> float:
    """Assert TP=2 reproduced TP=1 (tokens equal, every step's logits within `tolerance`); the max diff."""
    tokens1, logits1, prompt1 = one
    tokens2, logits2, prompt2 = two
    assert tokens2 == tokens1
    assert len(logits2) == len(logits1)
    diff = max((a - b).abs().max().item() for a, b in zip(logits1, logits2, strict=True))
    assert diff < tolerance, diff
    assert [p.token_id for p in prompt2[1:]] == [p.token_id for p in prompt1[1:]]
    assert max(abs(p.logprob - q.logprob) for p, q in zip(prompt1[1:], prompt2[1:], strict=True)) < tolerance
    print(f"TP=2 vs TP=1: {len(logits1)} sampling steps, logits max abs diff {diff:.2e}")
    return diff


# untied GQA; tied embeddings with q/k/v bias; per-head q/k norms with head_dim != hidden / heads
@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_two_ranks_give_the_logits_and_greedy_tokens_of_one(kind):
    path = str(tiny_checkpoint(kind))
    compare(run(make_engine(path, 1)), run(make_engine(path, 2)), tolerance=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_over_nccl_give_the_logits_and_greedy_tokens_of_one():
    """The NCCL path (no run yet: the device machines lent so far have one GPU). float32, so one rank's
    matmuls and the two ranks' partial sums differ by rounding only."""
    path = str(tiny_checkpoint("llama"))
    compare(run(make_engine(path, 1, device="cuda", dtype=torch.float32)),
            run(make_engine(path, 2, device="cuda", dtype=torch.float32)), tolerance=1e-3)


def compare_until_a_near_tie(one_engine, two_engine, tolerance: float) -> int:
    """bfloat16 greedy decoding of a random model meets near-ties, and a rounding difference may pick the
    other token there; after that the two sequences are different requests. So each request's tokens must
    agree up to a step where one rank's best two logits were within `tolerance` (a near-tie), and every
    logits row up to and including it within `tolerance`. Returns the number of rows compared."""
    one, two = run(one_engine), run(two_engine)
    compared = 0
    for request_id, tokens1 in one[0].items():
        tokens2 = two[0][request_id]
        rows1, rows2 = one_engine.rows_seen[request_id], two_engine.rows_seen[request_id]
        for i, (t1, t2) in enumerate(zip(tokens1, tokens2, strict=True)):
            diff = (rows1[i] - rows2[i]).abs().max().item()
            assert diff < tolerance, (request_id, i, diff)
            compared += 1
            if t1 != t2:
                best = rows1[i].topk(2).values
                assert (best[0] - best[1]).item() < tolerance, (request_id, i, "a flipped token without a near-tie")
                break
    assert max(t.abs().max().item() for t in one[1]) > 5  # logits far larger than the tolerance
    return compared


def test_a_4bit_gguf_shards_on_its_blocks_and_matches_one_rank(tmp_path):
    """Q4_0 kept quantized (bfloat16 on the CPU takes the int4 kernels): row-parallel projections are cut
    between 32-wide blocks; the ranks' bfloat16 partial sums differ from one rank's only by rounding."""
    path = str(write_tiny_gguf("llama", tmp_path / "tiny.Q4_0.gguf", qtype="Q4_0"))
    two = make_engine(path, 2, dtype=torch.bfloat16)
    assert two.runner.model.layers[0].self_attn.o_proj.inner.kernel_names == ["aten_int4_cpu"]
    compared = compare_until_a_near_tie(make_engine(path, 1, dtype=torch.bfloat16), two, tolerance=0.25)
    assert compared >= 20  # most of the 30 tokens: a near-tie is the exception


def _q4_0(rows: int, columns: int) -> GGUFTensor:
    data = np.random.default_rng(0).standard_normal((rows, columns)).astype(np.float32)
    return GGUFTensor(gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0), "Q4_0", (rows, columns))


def test_a_gguf_projection_cut_inside_a_quantization_block_is_refused_naming_the_option():
    layer = RowParallelLinear(64, 16, tp=TensorParallel(1, 4), quant=QuantConfig("gguf"), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"blocks are 32 wide.*--tensor-parallel-size"):
        layer.load_shard(0, "weight", _q4_0(16, 64))  # 16 input features a rank: half a Q4_0 block


def test_a_gguf_projection_cut_between_blocks_keeps_exactly_its_columns():
    weight = _q4_0(16, 128)
    whole = gguf.quants.dequantize(weight.raw, gguf.GGMLQuantizationType.Q4_0).reshape(16, 128)
    part = weight.columns(64, 128)
    np.testing.assert_array_equal(gguf.quants.dequantize(part.raw, gguf.GGMLQuantizationType.Q4_0).reshape(16, 64),
                                  whole[:, 64:])


def _config(**overrides) -> LlamaConfig:
    fields = dict(architecture="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=1,
                  num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)
    return LlamaConfig(**{**fields, **overrides})


@pytest.mark.parametrize(("overrides", "size", "message"), [
    ({"num_heads": 9, "num_kv_heads": 3, "head_dim": 8, "hidden_size": 72}, 2,
     r"number of attention heads \(9\) is not divisible by --tensor-parallel-size 2"),
    ({}, 4, r"number of KV heads \(2\) is not divisible by --tensor-parallel-size 4"),
])
def test_a_model_that_does_not_split_evenly_is_refused_naming_the_option(overrides, size, message):
    with pytest.raises(ModelLoadError, match=message):
        build_model(_config(**overrides), [], dtype=torch.float32, device="cpu", quant=None, source="m",
                    tp=TensorParallel(0, size))


def test_other_quantized_formats_are_refused_naming_the_option():
    with pytest.raises(ModelLoadError, match=r"awq checkpoints cannot be split.*--tensor-parallel-size 1"):
        build_model(_config(), [], dtype=torch.float32, device="cpu", quant=QuantConfig("awq", 32), source="m",
                    tp=TensorParallel(0, 2))


def test_a_worker_dying_while_the_engine_is_idle_fails_the_engine():
    """No step is in flight, so no collective notices: the watchdog must (requests then answer 503 and
    on_fatal exits the server). The worker is killed with SIGKILL, the one way to make it die on demand."""
    engine = make_engine(str(tiny_checkpoint("llama")), 2)
    fatal = threading.Event()
    server_engine = AsyncEngine(engine, on_fatal=lambda exc: fatal.set())
    server_engine.start()
    try:
        assert server_engine.healthy
        engine.workers.processes[0].kill()
        assert fatal.wait(timeout=10)
        assert not server_engine.healthy and "exited with code -9" in str(server_engine.error)

        async def submit():
            server_engine.generate("late", [1, 2, 3], SamplingParams(max_tokens=2))

        with pytest.raises(EngineDeadError):
            asyncio.run(submit())
    finally:
        server_engine.shutdown()  # closes the engine
