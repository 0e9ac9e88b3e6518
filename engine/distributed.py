"""Tensor-parallel process groups on torch.distributed: who this rank is, and the two collectives layers use.

All ranks run on one host. Rank 0 owns the scheduler and the HTTP server; ranks 1..N-1 are workers that
mirror its forward passes (engine/tp_workers.py). Two groups:
- `group`: the model's collectives (all-reduce after row-parallel layers, all-gather of vocabulary-parallel
  logits): NCCL on CUDA, gloo on the CPU, with a finite timeout so a stuck peer fails the step.
- `channel`: rank 0's per-step broadcast of the step's inputs, always gloo on host tensors (so a worker can
  wait idle for the next step without a device sync or a timeout: the channel's timeout is a year).

The rendezvous is a TCPStore that rank 0 opens on a free port; a dead peer closes its sockets, which fails
the collective in progress on the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

STEP_TIMEOUT = timedelta(minutes=10)  # one collective inside a step; past it the step fails
IDLE_TIMEOUT = timedelta(days=365)  # a worker waiting for rank 0's next step


@dataclass
class TensorParallel:
    """This process's place in the tensor-parallel group."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = None
    channel: dist.ProcessGroup | None = None

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `total` (heads, features, rows); ValueError naming
        `what` when it does not divide."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by --tensor-parallel-size {self.size}")
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., size * n], rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of each rank's `value` (the KV pool size every rank can hold)."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.channel)
        return int(t.item())


def rank_device(device: str, rank: int) -> str:
    """Rank r computes on cuda:r (CUDA) or on the CPU."""
    return f"cuda:{rank}" if torch.device(device).type == "cuda" else "cpu"


def open_store(size: int) -> tuple[dist.TCPStore, int]:
    """Rank 0: the rendezvous store on a free port (the port goes to the workers)."""
    store = dist.TCPStore("127.0.0.1", 0, size, is_master=True, timeout=STEP_TIMEOUT,
                          wait_for_workers=False)
    return store, store.port


def join(rank: int, size: int, store: dist.Store, device: str) -> TensorParallel:
    """Join the group (every rank calls this; it returns once all have)."""
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=STEP_TIMEOUT)
    channel = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return TensorParallel(rank, size, dist.group.WORLD, channel)


def connect_store(port: int, size: int) -> dist.TCPStore:
    """A worker's client of rank 0's store."""
    return dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=STEP_TIMEOUT)
