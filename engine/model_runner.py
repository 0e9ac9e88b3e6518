"""Owns the model and the KV pool; turns a scheduled batch into one forward pass and sampled tokens."""

from __future__ import annotations

import logging

import torch

from engine.config import EngineConfig
from engine.failures import is_fatal
from engine.layers.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from engine.sampler import Sampler, SampleResult
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence

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


class ModelRunner:
    def __init__(self, loaded, config: EngineConfig):
        self.model = loaded.model
        self.spec = loaded.spec
        self.config = config
        self.block_size = config.block_size
        self.device = next(self.model.parameters()).device
        self.dtype = self.spec.dtype
        log.info("Weights: %.1f MiB resident, computing in %s on %s", loaded.weight_bytes / 2**20,
                 str(self.dtype).removeprefix("torch."), self.device)
        self.num_blocks = self._num_blocks()
        self.kv_caches = allocate_kv_cache(
            self.spec.num_layers, self.num_blocks, self.block_size, self.spec.num_kv_heads, self.spec.head_dim,
            self.dtype, self.device,
        )
        self.sampler = Sampler()

    def _num_blocks(self) -> int:
        cfg, spec = self.config, self.spec
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks
        per_block = kv_cache_bytes_per_block(spec.num_layers, self.block_size, spec.num_kv_heads, spec.head_dim,
                                             self.dtype)
        if cfg.kv_cache_memory is not None:
            budget = cfg.kv_cache_memory
        elif self.device.type == "cuda":
            budget = int(available_memory(self.device) * cfg.gpu_memory_fraction)
        else:
            budget = min(cfg.cpu_kv_cache_memory, available_memory(self.device) // 2)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes is less than one block ({per_block} bytes)")
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", num_blocks, self.block_size,
                 num_blocks * per_block / 2**20)
        return num_blocks

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flatten the step's tokens (no padding) and describe where their K/V live."""
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
        device = self.device
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        query_start_loc = [0]
        for n in query_lens:
            query_start_loc.append(query_start_loc[-1] + n)
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32).to(device, non_blocking=True),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(device, non_blocking=True),
            block_tables=block_tables.to(device, non_blocking=True),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=bs,
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
        )
        input_ids_t = torch.tensor(input_ids, dtype=torch.long).to(device, non_blocking=True)
        return input_ids_t, torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True), attn

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], SampleResult | None]:
        """One forward pass over the batch; samples for the sequences whose chunk ends their tokens."""
        input_ids, positions, attn = self.prepare(batch)
        hidden = self.model(input_ids, positions, self.kv_caches, attn)
        rows, sampling = [], []
        end = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            end += n
            if seq.num_computed_tokens + n == seq.num_tokens:
                rows.append(end - 1)
                sampling.append(seq)
        if not sampling:
            return [], None
        last = hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, device=hidden.device)]
        logits = self.model.compute_logits(last).float()
        return sampling, self.sample(logits, sampling)

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
