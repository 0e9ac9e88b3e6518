"""One generation stream: its tokens, how many have KV in the cache, and the blocks that hold them."""

from __future__ import annotations

import itertools
from enum import Enum, auto

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


_ids = itertools.count()


class Sequence:
    """A request with n > 1 becomes n sequences sharing request_id, told apart by `index`."""

    __slots__ = (
        "seq_id", "request_id", "index", "token_ids", "num_prompt_tokens", "num_computed_tokens",
        "num_cached_tokens", "block_table", "block_hashes", "status", "params", "cache_salt",
        "finish_reason", "arrival_time", "first_scheduled_time", "first_token_time", "generator", "max_tokens",
        "num_registered_blocks", "grammar", "min_tokens_stop_ids", "prompt_logprobs",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        max_tokens: int,
        *,
        index: int = 0,
        cache_salt: str | None = None,
        arrival_time: float = 0.0,
    ):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_tokens = -1  # prompt tokens served by the prefix cache at first admission
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the leading full blocks, chained
        self.num_registered_blocks = 0  # leading blocks of block_table already offered to the prefix cache
        self.status = SequenceStatus.WAITING
        self.params = params
        self.cache_salt = cache_salt
        self.finish_reason: str | None = None
        self.arrival_time = arrival_time
        self.first_scheduled_time: float | None = None  # end of its queue wait (tracing)
        self.first_token_time: float | None = None
        self.generator = None  # torch.Generator for seeded sampling, made by the sampler
        self.max_tokens = max_tokens
        self.grammar = None  # llguidance matcher when the output is constrained (engine.structured)
        self.min_tokens_stop_ids: tuple[int, ...] = ()  # masked while fewer than params.min_tokens are out
        # With params.prompt_logprobs, on choice 0: entry i is the logprob of prompt token i + 1 (the model
        # runner appends them as prefill chunks are computed)
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None and index == 0 else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs still to compute: its prefill must run in full, without prefix-cache hits."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table}, {self.status.name})")
