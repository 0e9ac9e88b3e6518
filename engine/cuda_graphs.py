"""Decode steps as captured CUDA graphs, one per batch-size bucket (after nano-vllm and vLLM).

A decode-only step launches hundreds of small kernels whose CPU launch cost dwarfs their GPU time at small
batches. At start-up the runner captures the model's forward once per bucket (1, 2, 4, 8, 16, 32, ... up to
the largest batch) into CUDA graphs that read static input buffers; a step copies its inputs into those
buffers, pads the rows up to the bucket, and replays the bucket's graph, which writes its hidden states into
a static output. Prefill and mixed steps, and decode batches larger than the largest bucket, run eager.

Padding rows are harmless: each writes its K/V into a scratch block that the block manager never hands out
and attends to that block alone (seq_len 1), so no real sequence's cache is touched.

The capture mechanism is behind `GraphBackend` (`capture(fn) -> (graph, outputs)`, `graph.replay()`), so
CPU tests drive the bucket choice, the copy-in/out and the fallbacks with a stand-in backend;
`CudaGraphBackend` is the real one (torch.cuda.CUDAGraph, one memory pool shared by all buckets).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from typing import Protocol

import torch

from engine.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """The buckets: 1, 2, 4, 8, then every multiple of 16, and `max_batch_size` itself as the last one."""
    sizes = [n for n in (1, 2, 4, 8) if n < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return [*sizes, max_batch_size]


def pick_bucket(sizes: list[int], batch_size: int) -> int | None:
    """The smallest bucket that holds `batch_size` rows, or None (run eager) when none does."""
    i = bisect.bisect_left(sizes, batch_size)
    return sizes[i] if i < len(sizes) else None


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Graph, torch.Tensor]:
        """Record `fn` (which reads only static buffers) once; return the graph and its static output."""
        ...


class CudaGraphBackend:
    """torch.cuda.CUDAGraph capture; all buckets share one memory pool (the largest is captured first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Graph, torch.Tensor]:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.synchronize(self.device)
        return graph, out


ForwardFn = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


class DecodeGraphs:
    """Static buffers, one captured graph per bucket, and `run` for decode-only steps that fit a bucket.

    forward(input_ids, positions, attn) -> hidden [T, hidden] is the model over the runner's KV caches.
    `max_blocks_per_seq` bounds every block table (max_model_len / block_size, rounded up);
    `scratch_block` is the KV block reserved for padding rows.
    """

    def __init__(self, forward: ForwardFn, backend: GraphBackend, *, max_batch_size: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device):
        self.forward, self.backend = forward, backend
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        self.block_size, self.max_blocks_per_seq = block_size, max_blocks_per_seq
        self.scratch_block = scratch_block
        n = self.batch_sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[Graph, torch.Tensor]] = {}
        self.replays = 0

    def _static_forward(self, batch_size: int) -> torch.Tensor:
        """The model over the first `batch_size` rows of the static buffers: what a graph records.

        seq_lens_cpu says every row may be as long as the longest context, so code that sizes work from
        host values (the CPU attention path) covers any step; the CUDA kernels read seq_lens on the device.
        """
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
            block_size=self.block_size,
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=[self.max_blocks_per_seq * self.block_size] * batch_size,
        )
        return self.forward(self.input_ids[:batch_size], self.positions[:batch_size], attn)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first (smaller graphs then reuse its memory pool). Each bucket is
        run once eagerly first, so lazy initialisation (Triton compiles, cuBLAS handles) happens outside
        the capture."""
        for size in reversed(self.batch_sizes):
            self._pad(0, size)
            self._static_forward(size)
            self.graphs[size] = self.backend.capture(lambda size=size: self._static_forward(size))
        log.info("CUDA graphs: captured decode batch sizes %s", self.batch_sizes)

    def bucket_for(self, attn: AttentionMetadata) -> int | None:
        """The bucket a step replays, or None when it must run eager (prefill/mixed, or too large)."""
        if not attn.is_decode_only or attn.block_tables.shape[1] > self.max_blocks_per_seq:
            return None
        return pick_bucket(self.batch_sizes, attn.num_seqs)

    def _pad(self, start: int, end: int) -> None:
        """Rows [start, end) write into the scratch block and attend to it alone."""
        if start >= end:
            return
        self.input_ids[start:end].zero_()
        self.positions[start:end].zero_()
        self.slot_mapping[start:end].fill_(self.scratch_block * self.block_size)
        self.seq_lens[start:end].fill_(1)
        self.block_tables[start:end].fill_(self.scratch_block)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """Copy the step's inputs in, pad up to the bucket, replay; hidden [num_seqs, hidden] (a view of the
        graph's static output, valid until the next replay)."""
        n = attn.num_seqs
        size = self.bucket_for(attn)
        assert size is not None, "run() is for decode-only steps that fit a bucket (check bucket_for)"
        width = attn.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(attn.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(attn.seq_lens, non_blocking=True)
        # Columns past `width` keep stale ids: attention reads only the first ceil(seq_len / block_size).
        self.block_tables[:n, :width].copy_(attn.block_tables, non_blocking=True)
        self._pad(n, size)
        graph, out = self.graphs[size]
        graph.replay()
        self.replays += 1
        return out[:n]
