"""Paged attention (CPU path and the Triton decode kernel) against a dense causal reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.layers.attention import allocate_kv_cache, kv_cache_bytes_per_block, paged_attention
from tests.engine.attention_cases import DECODE_BATCH, SCALE, dense_reference, make_case

torch.set_num_threads(2)
REPO = Path(__file__).resolve().parents[2]


def run(case):
    out = paged_attention(case.q, case.k, case.v, case.kv_cache, case.attn, SCALE)
    torch.testing.assert_close(out, case.expected, atol=1e-5, rtol=1e-5)
    return out


def test_full_prefill():
    run(make_case([(13, 13)]))


def test_prefill_after_prefix_hit():
    run(make_case([(13, 4)]))  # 9 tokens (2 full blocks + 1) were cached by another request


def test_prefill_of_a_fully_cached_prompt_recomputes_last_token():
    run(make_case([(12, 1)]))


def test_chunked_prefill_over_several_steps():
    """A 14-token prompt prefilled in chunks of 5, 5, 4 through the same block table."""
    gen = torch.Generator().manual_seed(7)
    seq_len, block_size = 14, 4
    keys = torch.randn(seq_len, 2, 16, generator=gen)
    values = torch.randn(seq_len, 2, 16, generator=gen)
    q = torch.randn(seq_len, 6, 16, generator=gen)
    expected = dense_reference(q, keys, values)
    (kv_cache,) = allocate_kv_cache(1, 16, block_size, 2, 16, torch.float32, "cpu")
    table = [9, 2, 14, 5]
    from engine.layers.attention import AttentionMetadata

    for start, end in ((0, 5), (5, 10), (10, 14)):
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(
                [table[p // block_size] * block_size + p % block_size for p in range(start, end)]
            ),
            query_start_loc=torch.tensor([0, end - start], dtype=torch.int32),
            seq_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=torch.tensor([table], dtype=torch.int32),
            max_query_len=end - start,
            max_seq_len=end,
            block_size=block_size,
            query_lens_cpu=[end - start],
            seq_lens_cpu=[end],
        )
        out = paged_attention(q[start:end], keys[start:end], values[start:end], kv_cache, attn, SCALE)
        torch.testing.assert_close(out, expected[start:end], atol=1e-5, rtol=1e-5)


def test_mixed_batch_of_prefills_chunks_and_decodes():
    run(make_case([(7, 7), (10, 1), (12, 3), (1, 1), (20, 6), (9, 1)]))


def test_decode_batch_with_different_lengths():
    case = make_case(DECODE_BATCH)
    assert case.attn.max_query_len == 1
    run(case)


@pytest.mark.parametrize("shuffle", [False, True])
def test_block_tables_contiguous_or_not(shuffle):
    run(make_case([(9, 9), (17, 1), (11, 2)], shuffle=shuffle, seed=5))


def test_kv_write_goes_through_slot_mapping():
    case = make_case([(6, 6)], shuffle=True, seed=11)
    run(case)
    flat = case.kv_cache.view(2, -1, 2, 16)
    torch.testing.assert_close(flat[0, case.attn.slot_mapping], case.k)
    torch.testing.assert_close(flat[1, case.attn.slot_mapping], case.v)


def test_allocate_kv_cache_shape_and_bytes():
    caches = allocate_kv_cache(3, 10, 16, 2, 8, torch.float16, "cpu")
    assert len(caches) == 3 and caches[0].shape == (2, 10, 16, 2, 8) and caches[0].dtype == torch.float16
    assert kv_cache_bytes_per_block(3, 16, 2, 8, torch.float16) * 10 == sum(c.nbytes for c in caches)


def test_triton_decode_kernel_under_triton_interpret():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.engine.attention_cases", "--triton"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "triton decode kernel: ok" in result.stdout


@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (14, 2, 24), (8, 1, 32)])
def test_head_layouts_mha_gqa_mqa(heads, kv_heads, head_dim):
    for seqs in (DECODE_BATCH, [(7, 7), (10, 1), (12, 3)]):
        run(make_case(seqs, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, seed=heads))


def test_decode_step_is_one_batched_call_not_a_loop_over_sequences(monkeypatch):
    from engine.layers import attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", counting)
    run(make_case(DECODE_BATCH))
    assert len(calls) == 1 and calls[0][0] == len(DECODE_BATCH)
    calls.clear()
    run(make_case([(9, 1), (7, 7), (12, 1), (5, 1), (10, 4)]))  # mixed: one call for the decodes, one for the prefills
    assert len(calls) == 2 and calls[0][0] == 3 and calls[1][0] == 2  # [decodes, ...], then [prefills, H, n, D]


def test_prefills_of_very_different_sizes_run_one_call_each(monkeypatch):
    """Padding a 2-token chunk to a 30-token one over a 30-token context would more than double the work."""
    from engine.layers import attention

    calls = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape) or sdpa(q, *a, **kw))
    assert not attention.batch_prefills([30, 2, 3], [30, 5, 3])
    run(make_case([(30, 30), (5, 2), (3, 3)]))
    assert len(calls) == 3


@pytest.mark.parametrize("seqs", [[(30, 30)], [(30, 12)]], ids=["whole prompt", "chunk after a prefix hit"])
def test_a_lone_prefill_takes_the_cpu_flash_kernel_not_the_math_path(seqs):
    """The math path materialises every score row ([heads, n, context]); at a 1,024-token chunk it made a
    2,048-token prefill 4x slower. Only 4-D operands reach ATen's CPU flash kernel."""
    from torch.profiler import profile

    with profile() as prof:
        run(make_case(seqs))
    ops = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
    assert "aten::_scaled_dot_product_attention_math" not in ops


@pytest.mark.parametrize("seqs", [
    [(7, 7), (10, 4), (6, 6)],  # full prefills and a chunk after a prefix hit, padded together
    [(13, 13), (13, 5), (12, 1), (9, 9)],  # with a decode between them
    [(4, 2), (5, 3), (17, 4), (16, 4)],  # chunks whose contexts span blocks
])
def test_batched_prefills_match_the_dense_reference(seqs):
    from engine.layers import attention

    lens = [(n, s) for s, n in seqs if n > 1]
    assert attention.batch_prefills([n for n, _ in lens], [s for _, s in lens])
    run(make_case(seqs, seed=len(seqs)))


def test_split_kv_count_depends_on_shapes_only_and_fills_the_gpu(monkeypatch):
    """Batch 1 of an 8-KV-head model on 132 multiprocessors: 16 splits (not 8 programs per layer); big
    batches one pass; never more splits than the table has blocks; always a power of two."""
    from engine.layers import triton_attention as ta

    monkeypatch.setattr(ta, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    assert [ta.choose_num_splits(b, 8, 512, cuda) for b in (1, 2, 4, 8, 16, 32, 64)] == [16, 16, 8, 4, 2, 1, 1]
    assert ta.choose_num_splits(1, 8, 3, cuda) == 2 and ta.choose_num_splits(1, 8, 1, cuda) == 1
