"""Runtime knobs of one engine instance."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.support import parse_bytes  # noqa: F401 (the CLI's --kv-cache-memory parser)


@dataclass
class EngineConfig:
    model: str
    served_model_name: str | None = None
    dtype: torch.dtype | None = None  # None: the loader decides (engine.loader.default_dtype)
    device: str = "cpu"
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: see gpu_memory_fraction / CPU default
    # CUDA: the share of the GPU's total memory this engine may use: weights, the activation peak a warm-up
    # pass measures, and the KV pool, which gets what is left of it.
    gpu_memory_fraction: float = 0.9
    cpu_kv_cache_memory: int = 1 << 30  # CPU default when kv_cache_memory is not given
    num_kv_blocks: int | None = None  # exact pool size (tests); overrides the memory budget
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024  # per-step token budget (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the model's context length
    max_waiting_requests: int = 1024  # beyond this the server answers 503
    # Most tokens one request may generate over all its choices (n x max_tokens); a request without
    # max_tokens gets up to the context length, and never more than this / n per choice.
    max_tokens_per_request: int = 32768
    enable_prefix_caching: bool = True
    torch_threads: int | None = None
    # CUDA graphs for decode-only steps: None = on for CUDA, off elsewhere; True = never (eager always).
    enforce_eager: bool | None = None
    max_graph_batch_size: int = 512  # decode batches above this (or above max_num_seqs) run eager
    # Ranks one model is split across (engine/tp_workers.py); rank r computes on cuda:r, or on the CPU.
    tensor_parallel_size: int = 1
    # "auto": a quantized checkpoint's weights stay packed where the kernels take them (engine/quant);
    # "dense": every weight dequantized to the compute dtype at load (more memory, plain dense matmuls).
    quantization: str = "auto"

    def weights_quant(self):
        """The QuantSpec `load_model` gets: None lets the checkpoint decide; DEQUANTIZED forces dense."""
        if self.quantization == "dense":
            from engine.quant import DEQUANTIZED

            return DEQUANTIZED
        return None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a power of two")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1 or self.max_tokens_per_request < 1:
            raise ValueError("max_num_batched_tokens, max_num_seqs and max_tokens_per_request must be positive")
        if self.max_graph_batch_size < 1:
            raise ValueError("max_graph_batch_size must be positive")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be positive")
        if self.quantization not in ("auto", "dense"):
            raise ValueError("quantization must be 'auto' or 'dense'")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("gpu_memory_fraction must be in (0, 1]")

    def use_cuda_graphs(self, device: torch.device) -> bool:
        """Whether decode steps replay captured CUDA graphs on `device` (graphs need CUDA)."""
        if self.enforce_eager is None:
            return device.type == "cuda"
        return not self.enforce_eager
