"""Per-request sampling knobs, validated once when the request arrives."""

from __future__ import annotations

from dataclasses import dataclass, field


class SamplingParamError(ValueError):
    """An invalid sampling parameter; `param` is the OpenAI request field to blame."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = None  # None: up to the context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamError(message, param)

        check(isinstance(self.n, int) and 1 <= self.n <= 128, "n", "n must be an integer between 1 and 128")
        check(0.0 <= self.temperature <= 2.0, "temperature", "temperature must be between 0 and 2")
        check(0.0 < self.top_p <= 1.0, "top_p", "top_p must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "top_k must be -1, 0 or a positive integer")
        check(0.0 <= self.min_p <= 1.0, "min_p", "min_p must be between 0 and 1")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "presence_penalty must be between -2 and 2")
        check(
            -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "frequency_penalty must be between -2 and 2"
        )
        check(0.0 < self.repetition_penalty <= 2.0, "repetition_penalty", "repetition_penalty must be in (0, 2]")
        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            "max_tokens must be a positive integer",
        )
        check(self.seed is None or isinstance(self.seed, int), "seed", "seed must be an integer")
        check(
            len(self.stop) <= 4 and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "stop must be a non-empty string or a list of at most 4 non-empty strings",
        )
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "bad token id")
        check(
            isinstance(self.top_logprobs, int) and 0 <= self.top_logprobs <= 20,
            "top_logprobs",
            "top_logprobs must be between 0 and 20",
        )
        check(not self.top_logprobs or self.logprobs, "top_logprobs", "top_logprobs requires logprobs to be true")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
