"""The engine on a real CUDA device (marked `gpu`; skipped where torch sees no GPU, as in CI).

Run by bench/gpu_check.sh on the GPU machine: `pytest -m gpu tests/engine/test_gpu.py`. What CPU CI checks
with stand-ins (tests/engine/fake_device.py for device placement, a recording backend for CUDA graphs) is
checked here for real: every step tensor on CUDA, graphs captured and replayed, the Triton kernels compiled
for the chip, greedy tokens against transformers, seeds reproducible.

SmolLM2: `GPU_SMOLLM2_GGUF` when set (bench/gpu_prepare.sh writes an 8-layer slice of the demo GGUF to
.gpu/smollm2-slice.gguf, since the whole file does not fit a device call), else the installed demo GGUF.

`GPU_CHECK_DRY_RUN=1` (bench/gpu_check.sh --dry-run) runs the same tests on the CPU, graphs through the
recording stand-in of tests/engine/test_cuda_graphs.py and the Triton kernels under TRITON_INTERPRET=1, so
a mistake in a test is found before it costs device time; what only CUDA has (pinned memory, allocator
statistics) is skipped there.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from engine.config import EngineConfig
from engine.layers.attention import kv_cache_bytes_per_block
from engine.llm_engine import LLMEngine
from engine.loader import ModelLoadError, demo_model_path, load_model
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from tests.engine.checkpoints import KINDS, load_reference, tiny_checkpoint

DRY_RUN = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not DRY_RUN and not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cpu" if DRY_RUN else "cuda")  # the device under test


@pytest.fixture(autouse=True)
def _dry_run_graphs(monkeypatch):
    if DRY_RUN:
        from engine import model_runner
        from tests.engine.test_cuda_graphs import RecordingGraphs

        monkeypatch.setattr(model_runner, "make_graph_backend", lambda device: RecordingGraphs())
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Paged attention reads keys through block tables",
           "Hello", "What is the capital of France? The capital of France is"]
# bf16 against bf16: a greedy token may differ from the reference's argmax only where the reference itself
# nearly ties (its logit within this of the top one).
BF16_TIE = 0.25


def smollm2_path() -> Path:
    if os.environ.get("GPU_SMOLLM2_GGUF"):
        return Path(os.environ["GPU_SMOLLM2_GGUF"])
    try:
        return demo_model_path()
    except ModelLoadError:
        pytest.skip("no SmolLM2 GGUF (set GPU_SMOLLM2_GGUF, see bench/gpu_prepare.sh)")


def cuda_engine(path, dtype=torch.float32, **overrides) -> LLMEngine:
    config = dict(model=str(path), device=CUDA.type, dtype=dtype, block_size=16, kv_cache_memory=1 << 30,
                  max_num_batched_tokens=32, max_num_seqs=16,  # 32: prompts prefill in chunks
                  enforce_eager=False)
    return LLMEngine(EngineConfig(**{**config, **overrides}), metrics=False)


def generate(engine: LLMEngine, prompts, params) -> list[list[int]]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    ids = []
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        ids.append(f"g{i}-{id(p)}")
        engine.add_request(ids[-1], prompt, p)
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for delta in out.outputs:
                tokens[out.request_id].extend(delta.token_ids)
    return [tokens[i] for i in ids]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_models_greedy_on_cuda_equal_transformers(kind):
    """float32 on CUDA (graphs on, chunked prefill, four prompts batched) against transformers' generate."""
    path = tiny_checkpoint(kind)
    engine = cuda_engine(path)
    assert engine.runner.graphs is not None
    ours = generate(engine, PROMPTS, GREEDY)
    reference = load_reference(path)
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                     min_new_tokens=12, pad_token_id=0)
        assert tokens == out[0, len(ids):].tolist(), prompt
    assert engine.runner.graphs.replays > 0


def _check_bf16_against_reference(path):
    engine = cuda_engine(path, dtype=torch.bfloat16)
    ours = generate(engine, PROMPTS, GREEDY)
    reference = load_reference(path).to(CUDA, torch.bfloat16)
    worst = 0.0
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            logits = reference(torch.tensor([ids + tokens], device=CUDA)).logits[0].float()
        steps = logits[len(ids) - 1 : len(ids) - 1 + len(tokens)]
        gaps = steps.max(-1).values - steps.gather(1, torch.tensor(tokens, device=CUDA)[:, None])[:, 0]
        worst = max(worst, gaps.max().item())
    assert worst <= BF16_TIE, f"a greedy token {worst:.3f} below the reference's top logit"


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_models_bf16_greedy_tokens_are_the_references_within_ties(kind):
    _check_bf16_against_reference(tiny_checkpoint(kind))


def test_smollm2_bf16_greedy_tokens_are_the_references_within_ties():
    _check_bf16_against_reference(smollm2_path())


def test_cuda_graphs_give_the_eager_tokens():
    path = tiny_checkpoint("llama")
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 17, 5)]
    graphs = cuda_engine(path)
    eager = cuda_engine(path, enforce_eager=True)
    assert eager.runner.graphs is None
    assert generate(graphs, PROMPTS, params) == generate(eager, PROMPTS, params)
    assert graphs.runner.graphs.replays > 0


def test_a_seeded_request_repeats_whatever_else_is_in_the_batch():
    engine = cuda_engine(tiny_checkpoint("llama"))
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = generate(engine, PROMPTS[:1], seeded)[0]
    noise = SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)
    crowded = generate(engine, PROMPTS, [seeded, noise, noise, noise])[0]
    assert alone == crowded


def test_step_tensors_and_generators_live_on_cuda():
    engine = cuda_engine(tiny_checkpoint("llama"))
    runner = engine.runner
    assert all(c.device.type == CUDA.type for c in runner.kv_caches)
    a = Sequence("a", list(range(1, 20)), SamplingParams(temperature=1.0, seed=3), 4)
    a.block_table = [0, 1]
    input_ids, positions, attn = runner.prepare(ScheduledBatch([a], [19]))
    for t in (input_ids, positions, attn.slot_mapping, attn.query_start_loc, attn.seq_lens, attn.block_tables):
        assert t.device.type == CUDA.type
    if not DRY_RUN:
        assert runner.to_device._buffers and all(b.is_pinned() for b in runner.to_device._buffers.values())
    for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables"):
        assert getattr(runner.graphs, name).device.type == CUDA.type
    generate(engine, PROMPTS[:1], SamplingParams(temperature=1.0, seed=3, max_tokens=2))
    sampled = Sequence("s", [1, 2, 3], SamplingParams(temperature=1.0, seed=9), 4)
    runner.sampler(torch.randn(1, 50, device=CUDA), [sampled])
    assert sampled.generator.device.type == CUDA.type


def test_the_kv_pool_is_sized_from_the_measured_warmup_peak():
    if DRY_RUN:
        pytest.skip("needs the CUDA allocator's statistics")
    path = tiny_checkpoint("llama")
    torch.cuda.empty_cache()
    # A small fraction: the tiny model's blocks are 8 KiB, and the block manager keeps an object per block.
    engine = cuda_engine(path, kv_cache_memory=None, gpu_memory_fraction=0.08, max_num_batched_tokens=2048)
    runner = engine.runner
    free, total = torch.cuda.mem_get_info()
    spec = engine.loaded.spec
    pool = runner.num_blocks * kv_cache_bytes_per_block(spec.num_layers, 16, spec.num_kv_heads, spec.head_dim,
                                                        spec.dtype)
    assert runner.activation_peak > 0
    assert 0 < pool <= 0.08 * total - runner.activation_peak
    del engine, runner
    torch.cuda.empty_cache()


def test_triton_quant_kernels_compiled_for_the_gpu_match_float64():
    """The W4A16 / W8A16 cases CPU CI runs under TRITON_INTERPRET=1 (the first three, in bfloat16, FP8 codes:
    each case is a compile), compiled for this GPU."""
    from engine.quant import triton_kernels as tk
    from engine.quant.weights import Int4Weight, Int8Weight, pack_int4
    from tests.engine.quant_triton_check import CASES

    torch.manual_seed(0)
    for m, k, n, g, config in CASES[:3]:
        for dtype in (torch.bfloat16,):
            x = torch.randn(m, k, device=CUDA).to(dtype)
            w4 = Int4Weight(pack_int4(torch.randint(0, 16, (k, n))).to(CUDA),
                            (torch.rand(k // g, n) * 0.1 + 0.01).half().to(CUDA), (torch.randn(k // g, n) * 0.3).to(CUDA),
                            g)
            ref = x.double() @ w4.dequantize(dtype=torch.float64)
            y = tk.w4a16_matmul(x, w4, config)
            assert y.shape == (m, n) and y.dtype == dtype
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2, (m, k, n, dtype)
            codes = (torch.randn(n, k) * 40).to(torch.float8_e4m3fn).to(CUDA)
            w8 = Int8Weight(codes, (torch.rand(n, k // g) * 0.02 + 0.001).to(CUDA), g)
            ref = x.double() @ w8.dequantize(dtype=torch.float64).T
            y = tk.w8a16_matmul(x, w8, config)
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2, (m, k, n, dtype)


def test_quantized_tiny_model_serves_on_cuda_with_triton_kernels():
    """The tiny model's Q8_0 GGUF kept quantized on CUDA: a Triton W8A16 GEMM in every projection, graphs on."""
    from engine.quant import QuantConfig
    from tests.engine.checkpoints import tiny_gguf

    path = tiny_gguf("llama")
    loaded = load_model(path, dtype=torch.bfloat16, device=CUDA, quant=QuantConfig("gguf"))
    config = EngineConfig(model=str(path), device=CUDA.type, block_size=16, kv_cache_memory=1 << 28,
                          enforce_eager=False)
    engine = LLMEngine(config, loaded=loaded, metrics=False)
    tokens = generate(engine, PROMPTS[:2], GREEDY)
    assert all(len(t) == 12 for t in tokens) and engine.runner.graphs.replays > 0


@pytest.mark.parametrize("num_splits", [1, 4, 16, None])
def test_triton_decode_kernel_single_pass_and_split_kv_match_the_dense_reference(num_splits):
    if DRY_RUN and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is needed on CPU")
    from engine.layers import attention
    from engine.layers.triton_attention import paged_decode_attention
    from tests.engine.attention_cases import DECODE_BATCH, SCALE, make_case

    case = make_case(DECODE_BATCH + [(200, 1)], block_size=16, num_blocks=64, seed=7)
    cache = case.kv_cache.to(CUDA)
    attention.write_kv(cache, case.k.to(CUDA), case.v.to(CUDA), case.attn.slot_mapping.to(CUDA))
    tables = torch.nn.functional.pad(case.attn.block_tables, (0, 20)).to(CUDA)  # as wide as a graph's
    out = paged_decode_attention(case.q.to(CUDA), cache, tables, case.attn.seq_lens.to(CUDA), SCALE,
                                 num_splits=num_splits)
    torch.testing.assert_close(out.cpu(), case.expected, atol=1e-4, rtol=1e-4)


def test_triton_rms_norm_on_the_gpu_rounds_as_pytorch():
    from engine.layers.norm import rms_norm_torch
    from engine.layers.triton_norm import rms_norm

    if DRY_RUN and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is needed on CPU")
    torch.manual_seed(0)
    for hidden, dtype in ((576, torch.bfloat16), (4096, torch.bfloat16), (64, torch.float32), (128, torch.float16)):
        x = (torch.randn(33, hidden) * 3).to(CUDA, dtype)
        weight = (torch.rand(hidden) + 0.5).to(CUDA, dtype)
        got, expected = rms_norm(x, weight, 1e-5), rms_norm_torch(x, weight, 1e-5)
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-5, rtol=2 ** -6)
        if dtype != torch.float32:  # the same roundings: equal but where the float32 statistics differ by an ulp
            assert (got == expected).float().mean() > 0.97


def test_triton_rotary_on_the_gpu_rounds_as_pytorch():
    from engine.layers.rotary import RotaryEmbedding, apply_rotary_torch
    from engine.layers.triton_rotary import rotary

    if DRY_RUN and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter is needed on CPU")
    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    for heads, head_dim, dtype in ((40, 128, torch.bfloat16), (6, 16, torch.float32), (9, 64, torch.float16)):
        cos, sin = RotaryEmbedding(head_dim, rope, 8192).to(CUDA)(torch.arange(0, 4000, 37, device=CUDA), dtype)
        x = torch.randn(cos.shape[0], heads + 8, head_dim, device=CUDA).to(dtype)[:, :heads]
        got, expected = rotary(x, cos, sin), apply_rotary_torch(x, cos, sin)
        torch.testing.assert_close(got.float(), expected.float(), atol=1e-5, rtol=2 ** -6)
