"""Decode CUDA graphs and the warm-up KV sizing, driven on CPU.

`RecordingGraphs` stands in for torch.cuda.CUDAGraph, which cannot run without CUDA: `capture(fn)` runs fn
once (its output becomes the static output) and `replay()` runs fn again into that same tensor. That is
what a replayed graph does — recompute from whatever the static input buffers hold now — so the runner's
copy-in, padding and copy-out are exercised for real; only the kernel-level recording is not (the `gpu`
tests and bench/gpu_check.sh check that on a GPU).
"""

from __future__ import annotations

import pytest
import torch

from engine import model_runner
from engine.config import EngineConfig
from engine.cuda_graphs import DecodeGraphs, graph_batch_sizes, pick_bucket
from engine.layers.attention import AttentionMetadata
from engine.llm_engine import LLMEngine
from engine.loader import load_model
from engine.sampling_params import SamplingParams
from tests.engine.checkpoints import tiny_checkpoint
from tests.engine.fake_device import FakeDevice, OnDevice

torch.set_num_threads(2)


class RecordedGraph:
    def __init__(self, backend, fn, out):
        self.backend, self.fn, self.out = backend, fn, out

    def replay(self) -> None:
        self.backend.replayed.append(self.out.shape[0])
        self.out.copy_(self.fn())


class RecordingGraphs:
    """Stand-in for CudaGraphBackend (see the module docstring); records what was captured and replayed."""

    def __init__(self):
        self.captured: list[int] = []
        self.replayed: list[int] = []

    def capture(self, fn):
        out = fn()
        self.captured.append(out.shape[0])
        return RecordedGraph(self, fn, out), out


def test_buckets_are_powers_of_two_to_8_then_multiples_of_16_and_end_at_the_largest_batch():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]


def test_a_batch_takes_the_smallest_bucket_that_holds_it_and_none_past_the_largest():
    sizes = graph_batch_sizes(40)
    assert [pick_bucket(sizes, n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33, 40, 41)] == [
        1, 2, 4, 8, 8, 16, 16, 32, 40, 40, None]


@pytest.fixture(scope="module")
def tiny():
    return tiny_checkpoint("llama")


def _engine(path, monkeypatch, *, graphs: bool, loaded=None, **overrides) -> tuple[LLMEngine, RecordingGraphs]:
    backend = RecordingGraphs()
    monkeypatch.setattr(model_runner, "make_graph_backend", lambda device: backend)
    config = EngineConfig(model=str(path), block_size=4, num_kv_blocks=96, max_num_batched_tokens=32,
                          enforce_eager=not graphs, **overrides)
    return LLMEngine(config, loaded=loaded or load_model(path), metrics=False), backend


PROMPTS = ["The quick brown fox", "Hello there", "Paged attention reads blocks", "One", "Two more words", "Six"]


def _run(engine: LLMEngine, max_tokens=(7, 3, 9, 5, 2, 6)) -> tuple[dict, list[int]]:
    """Requests of different lengths, so decode batches shrink step by step (6 -> 1 rows); returns the
    tokens and the number of sequences of each decode-only step."""
    for i, (prompt, n) in enumerate(zip(PROMPTS, max_tokens, strict=True)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    tokens: dict = {}
    decode_steps = []
    real_run = engine.runner.run

    def run(batch):
        if all(n == 1 for n in batch.num_new_tokens):
            decode_steps.append(len(batch.seqs))
        return real_run(batch)

    engine.runner.run = run
    while engine.has_unfinished():
        for out in engine.step():
            for delta in out.outputs:
                tokens.setdefault(out.request_id, []).extend(delta.token_ids)
    return tokens, decode_steps


def test_decode_steps_replay_their_bucket_and_give_the_eager_tokens(tiny, monkeypatch):
    eager_tokens, _ = _run(_engine(tiny, monkeypatch, graphs=False)[0])
    engine, backend = _engine(tiny, monkeypatch, graphs=True, max_num_seqs=8)
    assert backend.captured == [8, 4, 2, 1]  # largest first, so smaller graphs reuse its pool
    tokens, decode_steps = _run(engine)
    assert tokens == eager_tokens
    # Every decode-only step replayed the smallest bucket holding it (3 rows -> 4, 5/6 rows -> 8); prefill
    # and mixed steps ran eager (no replay).
    assert decode_steps and backend.replayed == [pick_bucket([1, 2, 4, 8], n) for n in decode_steps]
    assert any(size > n for size, n in zip(backend.replayed, decode_steps, strict=True))  # padded rows ran


def _decode_metadata(slots: list[int], seq_lens: list[int], tables: list[list[int]]) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.arange(len(slots) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=1, max_seq_len=max(seq_lens), block_size=4, query_lens_cpu=[1] * len(slots),
        seq_lens_cpu=seq_lens)


def test_padding_rows_write_only_the_scratch_block():
    """A step of 3 rows replayed in the 4-row bucket after a 4-row step: the padding row must not replay
    the previous step's row 3 (its slot may belong to another sequence by now). The toy forward counts the
    writes per KV slot, as write_kv would store them."""
    block_size, scratch = 4, 9
    writes = torch.zeros((scratch + 1) * block_size, dtype=torch.long)

    def forward(input_ids, positions, attn):
        writes.index_add_(0, attn.slot_mapping, torch.ones_like(attn.slot_mapping))
        return input_ids[:, None].float() * 10 + attn.seq_lens[:, None]

    graphs = DecodeGraphs(forward, RecordingGraphs(), max_batch_size=4, max_blocks_per_seq=2, block_size=4,
                          scratch_block=scratch, device=torch.device("cpu"))
    graphs.capture()
    writes.zero_()
    out = graphs.run(torch.tensor([1, 2, 3, 4]), torch.tensor([5, 5, 5, 5]),
                     _decode_metadata([21, 22, 23, 24], [6, 6, 6, 6], [[0, 5], [1, 5], [2, 6], [3, 6]]))
    assert out.tolist() == [[16.0], [26.0], [36.0], [46.0]]
    out = graphs.run(torch.tensor([7, 8, 9]), torch.tensor([6, 6, 6]),
                     _decode_metadata([31, 32, 33], [7, 7, 7], [[0, 7], [1, 7], [2, 8]]))
    assert out.tolist() == [[77.0], [87.0], [97.0]]  # copied out: the step's rows only, fresh values
    assert writes.nonzero().flatten().tolist() == [21, 22, 23, 24, 31, 32, 33, scratch * block_size]
    assert writes[24] == 1  # the previous step's row 3 was not replayed


def test_a_graph_engine_leaves_the_kv_pool_of_an_eager_one(tiny, monkeypatch):
    """After the same requests, every block the scheduler owns holds what the eager engine wrote there
    (the graph engine's pool has one extra block at the end: the scratch block)."""
    eager, _ = _engine(tiny, monkeypatch, graphs=False)
    graphed, backend = _engine(tiny, monkeypatch, graphs=True, max_num_seqs=8)
    _run(eager)
    _run(graphed)
    assert any(size > 1 for size in backend.replayed)
    num_blocks = eager.runner.num_blocks
    assert graphed.runner.num_blocks == num_blocks
    for ours, theirs in zip(graphed.runner.kv_caches, eager.runner.kv_caches, strict=True):
        assert ours.shape[1] == num_blocks + 1
        torch.testing.assert_close(ours[:, :num_blocks], theirs, rtol=0, atol=1e-5)


def test_batches_past_the_largest_bucket_run_eager(tiny, monkeypatch):
    engine, backend = _engine(tiny, monkeypatch, graphs=True, max_graph_batch_size=2)
    assert backend.captured == [2, 1]
    _, decode_steps = _run(engine)
    assert max(decode_steps) > 2
    assert backend.replayed == [n for n in decode_steps if n <= 2]


def test_graph_buffers_live_on_the_model_device(tiny, monkeypatch):
    """Static buffers are made on the model's device: the graph engine runs on the fake device too."""
    eager_tokens, _ = _run(_engine(tiny, monkeypatch, graphs=False)[0])
    with FakeDevice() as dev:
        loaded = load_model(tiny)
        dev.put_module(loaded.model)
        engine, backend = _engine(tiny, monkeypatch, graphs=True, loaded=loaded, max_num_seqs=8)
        graphs = engine.runner.graphs
        for name in ("input_ids", "positions", "slot_mapping", "seq_lens", "block_tables", "query_start_loc"):
            assert isinstance(getattr(graphs, name), OnDevice), name
        tokens, _ = _run(engine)
    assert tokens == eager_tokens and backend.replayed


class SyncCheckingGraphs(RecordingGraphs):
    """RecordingGraphs whose captures refuse host reads of device values (a capture cannot sync)."""

    def capture(self, fn):
        with FakeDevice.no_host_sync():
            return super().capture(fn)


def test_the_captured_decode_forward_never_reads_device_values_on_the_host(tiny, monkeypatch):
    """What a graph records must not sync (a capture fails on it): the embedding, RoPE, K/V writes,
    attention and projections of a decode step read no device value on the host. Checked on the fake device
    through the CPU code paths; the CUDA-only kernels (Triton) are checked by the gpu tests."""
    from tests.engine.fake_device import HostSyncError

    with FakeDevice() as dev:
        x = dev.put(torch.ones(2))
        with FakeDevice.no_host_sync(), pytest.raises(HostSyncError):
            x.tolist()
        loaded = load_model(tiny)
        dev.put_module(loaded.model)
        backend = SyncCheckingGraphs()
        monkeypatch.setattr(model_runner, "make_graph_backend", lambda device: backend)
        config = EngineConfig(model=str(tiny), block_size=4, num_kv_blocks=64, max_num_seqs=4, enforce_eager=False)
        engine = LLMEngine(config, loaded=loaded, metrics=False)
        assert backend.captured == [4, 2, 1]
        assert engine.runner.graphs is not None


def test_enforce_eager_is_the_default_off_cuda_and_graphs_need_cuda(tiny):
    assert not EngineConfig(model="m").use_cuda_graphs(torch.device("cpu"))
    assert EngineConfig(model="m").use_cuda_graphs(torch.device("cuda"))
    assert not EngineConfig(model="m", enforce_eager=True).use_cuda_graphs(torch.device("cuda"))
    engine = LLMEngine(EngineConfig(model=str(tiny), block_size=4, num_kv_blocks=16), metrics=False)
    assert engine.runner.graphs is None
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        LLMEngine(EngineConfig(model=str(tiny), block_size=4, num_kv_blocks=16, enforce_eager=False), metrics=False)


# ---- warm-up and KV sizing ---------------------------------------------------------------------------


class ScriptedMemory:
    """Stand-in for CudaMemory (CPU has no allocator statistics): reports the numbers a test sets and
    records the order of the runner's calls, so the test sees the warm-up run between reset and read."""

    def __init__(self, *, total: int, in_use: int, peak_above_base: int):
        self.total, self.in_use, self.peak_above_base = total, in_use, peak_above_base
        self.calls: list[str] = []

    def reset_peak(self):
        self.calls.append("reset")

    def allocated(self):
        return 1000

    def peak_allocated(self):
        self.calls.append("peak")
        return 1000 + self.peak_above_base

    def free_and_total(self):
        self.calls.append("free")
        return self.total - self.in_use, self.total


def test_the_kv_pool_is_sized_from_the_warmup_peak(tiny, monkeypatch):
    from engine.layers import attention

    memory = ScriptedMemory(total=64 << 20, in_use=8 << 20, peak_above_base=5 << 20)
    monkeypatch.setattr(model_runner, "device_memory", lambda device: memory)
    events: list = []
    loaded = load_model(tiny)
    real_model_forward = loaded.model.forward
    monkeypatch.setattr(loaded.model, "forward", lambda ids, *a: events.append(("forward", ids.shape[0]))
                        or real_model_forward(ids, *a))
    real_alloc = attention.allocate_kv_cache
    monkeypatch.setattr(model_runner, "allocate_kv_cache",
                        lambda layers, blocks, *a: events.append(("allocate", blocks)) or real_alloc(layers, blocks, *a))
    config = EngineConfig(model=str(tiny), block_size=4, max_num_batched_tokens=300, max_num_seqs=4,
                          gpu_memory_fraction=0.5)
    engine = LLMEngine(config, loaded=loaded, metrics=False)

    per_block = attention.kv_cache_bytes_per_block(2, 4, loaded.spec.num_kv_heads, loaded.spec.head_dim,
                                                   loaded.spec.dtype)
    expected = (int(0.5 * (64 << 20)) - (8 << 20) - (5 << 20)) // per_block
    assert engine.runner.num_blocks == expected and engine.runner.activation_peak == 5 << 20
    # The warm-up ran the largest step (max_num_batched_tokens tokens, the last chunk of a context of the
    # model's 512 positions) over a throw-away pool, between resetting and reading the peak; only then was
    # the real pool allocated.
    assert memory.calls == ["reset", "peak", "free"]
    assert events == [("allocate", 512 // 4), ("forward", 300), ("allocate", expected)]


def test_no_room_left_for_the_kv_pool_is_a_clear_error(tiny, monkeypatch):
    memory = ScriptedMemory(total=64 << 20, in_use=30 << 20, peak_above_base=5 << 20)
    monkeypatch.setattr(model_runner, "device_memory", lambda device: memory)
    config = EngineConfig(model=str(tiny), block_size=4, max_num_batched_tokens=64, gpu_memory_fraction=0.5)
    with pytest.raises(ValueError, match="activation peak"):
        LLMEngine(config, loaded=load_model(tiny), metrics=False)
