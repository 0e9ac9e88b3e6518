"""Batching for embeddings: which inputs of which requests run in the next encoder pass.

There is no KV cache and no decode phase: an input is computed whole in one pass and is then done. A step
takes inputs round-robin over the waiting requests (one input of each in turn, oldest request first), so a
request of 2048 inputs shares every step with the small requests that arrive behind it instead of making
them wait for all of it. A step holds at most `max_num_seqs` inputs and at most `max_num_batched_tokens`
padded tokens (inputs x the longest of them), except that one input always fits.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class EmbeddingParams:
    dimensions: int | None = None  # truncate the vector to its first `dimensions` values (None: all)


@dataclass(eq=False)
class EmbeddingRequest:
    request_id: str
    inputs: list[list[int]]
    params: EmbeddingParams
    arrival_time: float
    vectors: list[torch.Tensor | None] = field(default_factory=list)
    next_input: int = 0  # the first input not yet scheduled
    num_done: int = 0
    first_scheduled_time: float | None = None

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)

    @property
    def finished(self) -> bool:
        return self.num_done == len(self.inputs)


@dataclass
class EmbeddingBatch:
    rows: list[tuple[EmbeddingRequest, int]] = field(default_factory=list)  # (request, input index)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def token_ids(self) -> list[list[int]]:
        return [request.inputs[i] for request, i in self.rows]


class EmbeddingScheduler:
    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[EmbeddingRequest] = deque()  # requests with inputs not yet scheduled

    def add(self, request: EmbeddingRequest) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting)

    def abort(self, request: EmbeddingRequest) -> None:
        if request in self.waiting:
            self.waiting.remove(request)

    def schedule(self) -> EmbeddingBatch:
        batch = EmbeddingBatch()
        longest = 0
        now = time.perf_counter()
        while self.waiting and len(batch.rows) < self.max_num_seqs:
            request = self.waiting[0]
            width = max(longest, len(request.inputs[request.next_input]))
            if batch.rows and width * (len(batch.rows) + 1) > self.max_num_batched_tokens:
                break
            self.waiting.popleft()
            batch.rows.append((request, request.next_input))
            longest = width
            request.next_input += 1
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            if request.next_input < len(request.inputs):
                self.waiting.append(request)  # its next input waits for the others' turn
        return batch
