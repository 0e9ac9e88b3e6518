"""Owns the model and the KV pool; turns a scheduled batch into one forward pass and sampled tokens.

Every tensor a step builds lives on the model's device (`self.device`): the step's integer metadata goes
over in two copies (pinned and asynchronous on CUDA), the sampler builds its tensors on the logits' device.
On CUDA a warm-up step of the largest batch measures the activation peak before the KV pool is sized, and
decode-only steps replay CUDA graphs captured per batch-size bucket (engine/cuda_graphs.py) unless
`enforce_eager`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import CudaGraphBackend, DecodeGraphs, GraphBackend
from engine.failures import is_fatal
from engine.layers.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from engine.sampler import Sampler, SampleResult
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

if TYPE_CHECKING:
    from engine.distributed import TensorParallel
    from engine.tp_workers import Workers

log = logging.getLogger(__name__)


def available_memory(device: torch.device) -> int:
    """Free bytes on the device (CUDA), or MemAvailable on the host."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


class DeviceMemory(Protocol):
    """What KV-pool sizing reads from the device: CudaMemory on CUDA; tests pass their own."""

    def reset_peak(self) -> None: ...
    def allocated(self) -> int: ...
    def peak_allocated(self) -> int: ...
    def free_and_total(self) -> tuple[int, int]: ...


class CudaMemory:
    def __init__(self, device: torch.device):
        self.device = device

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def peak_allocated(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def free_and_total(self) -> tuple[int, int]:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)


def device_memory(device: torch.device) -> DeviceMemory | None:
    """The memory probe KV sizing uses on `device` (None: no warm-up, the CPU budget applies)."""
    return CudaMemory(device) if device.type == "cuda" else None


def make_graph_backend(device: torch.device) -> GraphBackend:
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, the model is on {device} (pass enforce_eager=True)")
    return CudaGraphBackend(device)


class HostToDevice:
    """Moves a step's integer metadata to the device, one copy per dtype.

    On CUDA the values go through a pinned host buffer so `non_blocking` copies really are asynchronous; a
    buffer is reused only after the event recorded behind its last copy has completed (a step that samples
    nothing does not synchronise, so the next step could otherwise overwrite values still being copied).
    On the CPU the tensor is built in place.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._events: dict[torch.dtype, torch.cuda.Event] = {}

    def __call__(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if self.device.type == "cpu":
            return host
        if not self.pinned:
            return host.to(self.device)
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < len(values):
            buf = self._buffers[dtype] = torch.empty(max(len(values), 2 * (0 if buf is None else buf.numel()),
                                                         4096), dtype=dtype, pin_memory=True)
            self._events[dtype] = torch.cuda.Event()
        event = self._events[dtype]
        event.synchronize()  # the previous copy out of this buffer is done
        staged = buf[: len(values)]
        staged.copy_(host)
        out = staged.to(self.device, non_blocking=True)
        event.record()
        return out


@dataclass
class StepInputs:
    """A step's flattened integer inputs on the host: what the device copies are made of, and what rank 0
    broadcasts to tensor-parallel workers (engine/tp_workers.py)."""

    longs: list[int]  # input ids, positions, KV slots: T each
    ints: list[int]  # query_start_loc [B + 1], seq_lens [B], block tables [B, width] (zero-padded)
    query_lens: list[int]
    seq_lens: list[int]
    width: int


class ModelRunner:
    """With tensor parallelism (`tp`) every rank has one, over its shard and its KV heads; rank 0's also
    has `workers` and tells them each step's inputs and which rows it computes logits of, so that their
    collectives pair up with its own."""

    def __init__(self, loaded, config: EngineConfig, *, tp: TensorParallel | None = None,
                 workers: Workers | None = None):
        self.model = loaded.model
        self.spec = loaded.spec
        self.config = config
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.workers = workers
        self.block_size = config.block_size
        self.device = next(self.model.parameters()).device
        self.dtype = self.spec.dtype
        self.num_kv_heads = self.spec.num_kv_heads // (self.tp.size if self.tp else 1)  # this rank's
        log.info("Weights: %.1f MiB resident, computing in %s on %s", loaded.weight_bytes / 2**20,
                 str(self.dtype).removeprefix("torch."), self.device)
        self.to_device = HostToDevice(self.device)
        self.sampler = Sampler()
        self.activation_peak: int | None = None  # bytes, measured by the warm-up pass (CUDA)
        self.num_blocks = self._num_blocks()
        if self.tp is not None:  # rank 0's scheduler hands out block ids every rank must hold
            self.num_blocks = self.tp.min_int(self.num_blocks)
        use_graphs = config.use_cuda_graphs(self.device)
        if use_graphs and self.tp is not None:
            log.info("tensor parallel: CUDA graphs off, every step runs eager")
            use_graphs = False
        # With graphs, one more block than the scheduler knows of: the scratch block padding rows write to.
        self.kv_caches = allocate_kv_cache(
            self.spec.num_layers, self.num_blocks + use_graphs, self.block_size, self.num_kv_heads,
            self.spec.head_dim, self.dtype, self.device,
        )
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            max_len = min(config.max_model_len or self.spec.max_position_embeddings,
                          self.spec.max_position_embeddings, self.num_blocks * self.block_size)
            self.graphs = DecodeGraphs(
                self._forward, make_graph_backend(self.device),
                max_batch_size=min(config.max_num_seqs, config.max_graph_batch_size),
                max_blocks_per_seq=-(-max_len // self.block_size), block_size=self.block_size,
                scratch_block=self.num_blocks, device=self.device,
            )
            self.graphs.capture()

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_caches, attn)

    def _num_blocks(self) -> int:
        cfg, spec = self.config, self.spec
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_cache_bytes_per_block(spec.num_layers, self.block_size, self.num_kv_heads, spec.head_dim,
                                             self.dtype)
        memory = device_memory(self.device)
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
            if memory is not None:
                self.activation_peak = self.profile_activation_peak(memory)
        elif memory is not None:
            budget = self.kv_budget_from_warmup(memory)
        else:
            budget = min(cfg.cpu_kv_cache_memory, available_memory(self.device) // 2)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is less than one block ({per_block} bytes)")
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                 num_blocks * per_block / 2**20)
        return num_blocks

    def kv_budget_from_warmup(self, memory: DeviceMemory) -> int:
        """Bytes for the KV pool: gpu_memory_fraction of the device's memory, less what is in use now
        (weights, other processes) and the activation peak a warm-up step of the largest batch reaches."""
        peak = self.activation_peak = self.profile_activation_peak(memory)
        free, total = memory.free_and_total()
        budget = int(total * self.config.gpu_memory_fraction) - (total - free) - peak
        log.info("KV sizing: %.2f GiB total x %.2f, %.2f GiB in use, activation peak %.2f GiB -> %.2f GiB for KV",
                 total / 2**30, self.config.gpu_memory_fraction, (total - free) / 2**30, peak / 2**30,
                 budget / 2**30)
        if budget <= 0:
            raise ValueError(
                f"no memory left for the KV cache: {total * self.config.gpu_memory_fraction / 2**30:.2f} GiB "
                f"allowed (--gpu-memory-fraction), {(total - free) / 2**30:.2f} GiB in use and a "
                f"{peak / 2**30:.2f} GiB activation peak; raise --gpu-memory-fraction or lower "
                f"--max-num-batched-tokens")
        return budget

    @torch.inference_mode()
    def profile_activation_peak(self, memory: DeviceMemory) -> int:
        """Run the heaviest step the scheduler can build over a throw-away KV pool and return the peak bytes
        it allocated beyond the weights and that pool. The step: max_num_batched_tokens new tokens, as the
        last chunk of a context of max_model_len (so the longest attention is measured too; more sequences
        only when the budget is over one context), then sampling max_num_seqs rows with filters on. Also
        warms up kernels (Triton compiles) before the real pool is allocated."""
        cfg, spec, bs = self.config, self.spec, self.block_size
        max_len = min(cfg.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        per_seq_blocks = -(-max_len // bs)
        chunks, tokens = [], cfg.max_num_batched_tokens
        while tokens > 0 and len(chunks) < cfg.max_num_seqs:
            chunks.append(min(tokens, max_len))
            tokens -= chunks[-1]
        memory.reset_peak()
        caches = allocate_kv_cache(spec.num_layers, len(chunks) * per_seq_blocks, bs, self.num_kv_heads,
                                   spec.head_dim, self.dtype, self.device)
        base = memory.allocated()
        batch = ScheduledBatch()
        for i, n in enumerate(chunks):
            seq = Sequence("warmup", [0] * max_len, SamplingParams(temperature=1.0, top_p=0.9, top_k=50), 1)
            seq.block_table = list(range(i * per_seq_blocks, (i + 1) * per_seq_blocks))
            seq.num_computed_tokens = max_len - n
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
        input_ids, positions, attn = self.prepare(batch)
        hidden = self.model(input_ids, positions, caches, attn)
        rows = min(cfg.max_num_seqs, hidden.shape[0])
        logits = self.model.compute_logits(hidden[-rows:]).float()
        self.sampler(logits, [batch.seqs[-1]] * rows)
        del caches, hidden, logits, input_ids, positions, attn
        peak = memory.peak_allocated() - base
        log.info("warm-up: %d new tokens in %d sequences of %d context, activation peak %.1f MiB",
                 sum(chunks), len(chunks), max_len, peak / 2**20)
        return peak

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step's tokens (no padding) and describe where their K/V live."""
        return self.to_tensors(self.flatten(batch))

    def flatten(self, batch: ScheduledBatch) -> StepInputs:
        """The step's integer inputs as host lists."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        bs = self.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            table = seq.block_table
            if n == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
                for block_index in range(start // bs, (end - 1) // bs + 1):
                    base = table[block_index] * bs
                    lo, hi = max(start, block_index * bs), min(end, (block_index + 1) * bs)
                    slots.extend(range(base + lo % bs, base + (hi - 1) % bs + 1))
            query_lens.append(n)
            seq_lens.append(end)
            tables.append(table)
        width = max(len(t) for t in tables)
        query_start_loc = [0]
        for n in query_lens:
            query_start_loc.append(query_start_loc[-1] + n)
        return StepInputs(input_ids + positions + slots,
                          query_start_loc + seq_lens + [i for tb in tables for i in tb + [0] * (width - len(tb))],
                          query_lens, seq_lens, width)

    def to_tensors(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, attention metadata) on the device, from the step's host lists."""
        # Two host-to-device copies per step: the int64 token-level values and the int32 sequence-level ones.
        query_lens, seq_lens, width, bs = inputs.query_lens, inputs.seq_lens, inputs.width, self.block_size
        t, b = len(inputs.longs) // 3, len(seq_lens)
        longs = self.to_device(inputs.longs, torch.long)
        ints = self.to_device(inputs.ints, torch.int32)
        attn = AttentionMetadata(
            slot_mapping=longs[2 * t:],
            query_start_loc=ints[: b + 1],
            seq_lens=ints[b + 1 : 2 * b + 1],
            block_tables=ints[2 * b + 1 :].view(b, width),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        return longs[:t], longs[t : 2 * t], attn

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None, dict[int, BaseException]]:
        """One forward pass over the batch; samples for the sequences whose chunk ends their tokens.
        Also records prompt logprobs (`prompt_logprobs`); the third value maps the seq_id of a sequence
        whose prompt logprobs failed to the error (its request fails alone)."""
        rows, sampling = [], []
        end = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            end += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(end - 1)
                sampling.append(seq)
        inputs = self.flatten(batch)
        if self.workers is not None:
            self.workers.step(inputs, rows)
        hidden = self.forward(*self.to_tensors(inputs))
        logits = self.model.compute_logits(self.select_rows(hidden, rows)).float() if rows else None
        failures = self.prompt_logprobs(batch, hidden) if any(s.wants_prompt_logprobs for s in batch.seqs) else {}
        if not sampling:
            return [], None, failures
        return sampling, self.sample(logits, sampling), failures

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor:
        """The step's hidden states: a captured CUDA graph when one fits, else the eager model."""
        if self.graphs is not None and self.graphs.bucket_for(attn) is not None:
            return self.graphs.run(input_ids, positions, attn)
        return self.model(input_ids, positions, self.kv_caches, attn)

    @staticmethod
    def select_rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, device=hidden.device)]

    def prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> dict[int, BaseException]:
        """Append, to each sequence that wants them, the logprobs of the prompt tokens its chunk predicts:
        the row at position p gives the distribution of token p + 1 (the last prompt position's row is
        the first generated token's, sampled as usual). Positions already recorded (a chunk recomputed
        after preemption) are skipped; such a sequence never takes prefix-cache hits, so no position is
        skipped unseen. Returns {seq_id: error} for the sequences whose computation failed."""
        failures: dict[int, BaseException] = {}
        first_row = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            row, first_row = first_row, first_row + n
            if not seq.wants_prompt_logprobs:
                continue
            start = seq.num_computed_tokens
            lo, hi = max(start, len(seq.prompt_logprobs)), min(start + n, seq.num_prompt_tokens - 1)
            if lo >= hi:
                continue
            try:
                seq.prompt_logprobs.extend(self._token_logprobs(
                    hidden[row + lo - start:row + hi - start], seq.token_ids[lo + 1:hi + 1], seq.params.prompt_logprobs,
                    first_row=row + lo - start))
            except Exception as exc:  # noqa: BLE001 - this sequence's request fails alone
                if is_fatal(exc):
                    raise
                failures[seq.seq_id] = exc
        return failures

    def _token_logprobs(self, hidden: torch.Tensor, targets: list[int], k: int, rows_per_pass: int = 256, *,
                        first_row: int = 0) -> list[tuple[float, int, list[tuple[int, float]]]]:
        """(logprob, rank, top k alternatives) of each target token under its row's distribution, a few
        hundred rows at a time so a long prompt never holds a [prompt, vocabulary] tensor. `first_row`:
        where `hidden` starts in the step's hidden states (tensor-parallel workers compute the same rows)."""
        out = []
        for i in range(0, len(targets), rows_per_pass):
            if self.workers is not None:
                self.workers.logits(first_row + i, first_row + min(i + rows_per_pass, len(targets)))
            logprobs = self.model.compute_logits(hidden[i:i + rows_per_pass]).float().log_softmax(-1)
            target = torch.tensor(targets[i:i + rows_per_pass], dtype=torch.long, device=logprobs.device)
            chosen = logprobs.gather(1, target.unsqueeze(1))
            ranks = (logprobs > chosen).sum(-1) + 1
            if k:
                top = logprobs.topk(k)
                alternatives = [list(zip(ids, vals, strict=True))
                                for ids, vals in zip(top.indices.tolist(), top.values.tolist(), strict=True)]
            else:
                alternatives = [[] for _ in range(len(target))]
            out.extend(zip(chosen.squeeze(1).tolist(), ranks.tolist(), alternatives, strict=True))
        return out

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """The batch's tokens; `errors[i]` is set for a row whose sampling failed (that request fails alone).

        The batch is sampled in one go; if that raises, each row is sampled on its own, so one bad row
        cannot fail its neighbours. An error that breaks the device for everyone (is_fatal) propagates.
        """
        try:
            result = self.sampler(logits, seqs)
            result.errors = [None] * len(seqs)
            return result
        except Exception as exc:  # noqa: BLE001 - attributed row by row below
            if is_fatal(exc):
                raise
            log.warning("batched sampling failed (%r); sampling row by row", exc)
        result = SampleResult([], [], [])
        for row, seq in enumerate(seqs):
            try:
                one = self.sampler(logits[row:row + 1], [seq])
                token, logprobs, error = one.token_ids[0], one.logprobs[0], None
            except Exception as exc:  # noqa: BLE001 - this row's request fails alone
                if is_fatal(exc):
                    raise
                token, logprobs, error = 0, None, exc
            result.token_ids.append(token)
            result.logprobs.append(logprobs)
            result.errors.append(error)
        return result
