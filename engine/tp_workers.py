"""Tensor-parallel workers: rank 0 starts them, tells them each step, and notices when one dies.

One scheduler, in rank 0. Each step rank 0 broadcasts the step's integer inputs (StepInputs) and the rows
it will compute logits of; every worker runs the same forward pass over its shard and KV heads and the
same compute_logits calls, so the all-reduces and all-gathers inside the model pair up. Workers sample
nothing and keep no sequences; a worker is a mirror of rank 0's ModelRunner.

Messages (engine/distributed.py's gloo channel): a fixed header [kind, payload length, a, b, c, d] of int64
then, when the length is not 0, an int64 payload.
- STEP: payload = longs + ints + logits rows; (a, b, c, d) = (tokens, sequences, table width, rows).
- LOGITS: (a, b) = a row range of the last step's hidden states (prompt logprobs, a few hundred at a time).

Failure: a worker that raises logs it and exits 1; rank 0's watchdog sees any worker exit and calls the
engine's failure path (AsyncEngine.fail: every request answers 503, then the process exits 1). A collective
with a dead peer fails on its own too (its sockets close). A worker exits when rank 0 is gone.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.distributed import TensorParallel, connect_store, join, open_store, rank_device
from engine.model_runner import ModelRunner, StepInputs

log = logging.getLogger(__name__)

STEP, LOGITS = 1, 2
_HEADER = 6


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker process exited: the engine cannot run another step."""


class StepChannel:
    """Rank 0 -> workers, over the gloo channel of `tp`."""

    def __init__(self, tp: TensorParallel):
        self.tp = tp

    def send(self, kind: int, fields: tuple[int, ...], payload: list[int] | None = None) -> None:
        payload = payload or []
        header = torch.tensor([kind, len(payload), *fields, *[0] * (_HEADER - 2 - len(fields))], dtype=torch.long)
        dist.broadcast(header, 0, group=self.tp.channel)
        if payload:
            dist.broadcast(torch.tensor(payload, dtype=torch.long), 0, group=self.tp.channel)

    def receive(self) -> tuple[int, list[int], list[int]]:
        """(kind, the header's four fields, payload) of rank 0's next message (blocks until it comes)."""
        header = torch.empty(_HEADER, dtype=torch.long)
        dist.broadcast(header, 0, group=self.tp.channel)
        kind, length, *fields = header.tolist()
        payload = torch.empty(length, dtype=torch.long)
        if length:
            dist.broadcast(payload, 0, group=self.tp.channel)
        return kind, fields, payload.tolist()


class Workers:
    """Rank 0's handle on ranks 1..N-1: started and joined by `start`, told each step by ModelRunner."""

    def __init__(self, tp: TensorParallel, processes: list[multiprocessing.Process]):
        self.tp = tp
        self.channel = StepChannel(tp)
        self.processes = processes
        self.error: WorkerDiedError | None = None
        self._on_death: Callable[[BaseException], None] = lambda exc: None
        self._stopping = False
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()

    @classmethod
    def start(cls, config: EngineConfig) -> Workers:
        """Spawn the workers (each loads its own shard) and join the group with them as rank 0."""
        size = config.tensor_parallel_size
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a torch.distributed group: one tensor-parallel "
                               "engine per process (close the other first)")
        if torch.device(config.device).type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"--tensor-parallel-size {size} needs {size} GPUs, found {torch.cuda.device_count()}")
        store, port = open_store(size)
        context = multiprocessing.get_context("spawn")
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # workers log as rank 0 does
        processes = [context.Process(target=worker_main, args=(rank, port, config, level), name=f"tp-worker-{rank}",
                                     daemon=True) for rank in range(1, size)]
        for process in processes:
            process.start()
        try:
            _wait_for_workers(store, processes)
            tp = join(0, size, store, rank_device(config.device, 0))
        except BaseException:
            _kill(processes)
            raise
        log.info("tensor parallel: %d ranks (workers: pids %s)", size, [p.pid for p in processes])
        return cls(tp, processes)

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(WorkerDiedError)` (on the watchdog thread) when a worker exits; at once if one has."""
        self._on_death = callback
        if self.error is not None:
            callback(self.error)

    def step(self, inputs: StepInputs, rows: list[int]) -> None:
        t, b = len(inputs.longs) // 3, len(inputs.seq_lens)
        self.channel.send(STEP, (t, b, inputs.width, len(rows)), inputs.longs + inputs.ints + rows)

    def logits(self, start: int, end: int) -> None:
        self.channel.send(LOGITS, (start, end))

    def stop(self) -> None:
        """End the workers (they hold no state of their own) and leave the group."""
        self._stopping = True
        _kill(self.processes)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _watch(self) -> None:
        by_sentinel = {p.sentinel: p for p in self.processes}
        ready = multiprocessing.connection.wait(list(by_sentinel))
        if self._stopping:
            return
        dead = by_sentinel[ready[0]]
        dead.join(timeout=5)  # its sentinel closes a moment before it can be reaped for its exit code
        self.error = WorkerDiedError(f"tensor-parallel worker {dead.name} (pid {dead.pid}) exited with code "
                                     f"{dead.exitcode}")
        log.critical("%s", self.error)
        self._on_death(self.error)


def _wait_for_workers(store: dist.TCPStore, processes: list[multiprocessing.Process]) -> None:
    """Until every worker has reached the store; a worker that exits first fails the start now (not at the
    rendezvous timeout)."""
    keys = [f"worker{rank}" for rank in range(1, len(processes) + 1)]
    while not store.check(keys):
        for process in processes:
            if process.exitcode is not None:
                raise WorkerDiedError(f"tensor-parallel worker {process.name} exited with code {process.exitcode} "
                                      "before joining (see its log above)")
        time.sleep(0.05)


def _kill(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()


def worker_main(rank: int, port: int, config: EngineConfig, log_level: str = "INFO") -> None:
    """A worker process: join, load this rank's shard, size the same KV pool, then mirror rank 0's steps
    until it is stopped. Any error is logged and exits 1 (rank 0's watchdog fails the engine)."""
    from engine import telemetry

    telemetry.configure_logging(log_level)  # LOG_FORMAT=json as rank 0
    _exit_with_parent()
    try:
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        from engine.loader import load_model

        store = connect_store(port, config.tensor_parallel_size)
        store.set(f"worker{rank}", "up")
        device = rank_device(config.device, rank)
        tp = join(rank, config.tensor_parallel_size, store, device)
        runner = ModelRunner(load_model(config.model, dtype=config.dtype, device=device, quant=config.weights_quant(),
                                       tp=tp), config, tp=tp)
        mirror_steps(runner, StepChannel(tp))
    except BaseException:
        log.exception("tensor-parallel worker %d failed", rank)
        logging.shutdown()
        os._exit(1)


@torch.inference_mode()
def mirror_steps(runner: ModelRunner, channel: StepChannel) -> None:
    """Run rank 0's steps on this rank's shard; the outputs (whole on every rank) are dropped here."""
    hidden = None
    while True:
        kind, (a, b, c, d), payload = channel.receive()
        if kind == STEP:
            longs, ints, rows = payload[:3 * a], payload[3 * a:len(payload) - d], payload[len(payload) - d:]
            starts, seq_lens = ints[:b + 1], ints[b + 1:2 * b + 1]
            query_lens = [end - start for start, end in zip(starts, starts[1:], strict=False)]
            hidden = runner.forward(*runner.to_tensors(StepInputs(longs, ints, query_lens, seq_lens, c)))
            if rows:
                runner.model.compute_logits(runner.select_rows(hidden, rows))
        elif kind == LOGITS:
            runner.model.compute_logits(hidden[a:b])
        else:
            raise ValueError(f"unknown step message {kind}")


def _exit_with_parent() -> None:
    """Exit when rank 0's process is gone (it may have left with os._exit, which runs no cleanup)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
