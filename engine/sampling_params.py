"""Per-request sampling knobs, validated once when the request arrives.

The range of every knob is written once, here, as an annotated type; the OpenAI request schema
(`engine.schema`, shared by the engine server and the gateway) uses the same types, so the HTTP API and
the offline `SamplingParams(...)` can never disagree on what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from engine.guides import Guide

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOP_SEQUENCES = 4
# Bounds on per-request work in the step loop (a stop string is searched after every token; a bias or a
# stop id list is applied every step), so that no request can slow down its batch neighbours.
MAX_STOP_LENGTH = 1024
MAX_TOKEN_LIST = 1024

Choices = Annotated[int, Field(ge=1, le=128)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]  # 0: only the most likely token
TopK = Annotated[int, Field(ge=-1, le=INT64_MAX)]  # -1 or 0: off; at least the vocabulary: off
MinP = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
RepetitionPenalty = Annotated[float, Field(gt=0, le=2)]
Seed = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
MaxTokens = Annotated[int, Field(ge=1)]
MinTokens = Annotated[int, Field(ge=0)]  # at most max_tokens: checked with it
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]  # below the vocabulary size: checked with the model
LogitBias = Annotated[float, Field(ge=-100, le=100)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
TokenIdList = Annotated[list[TokenId], Field(max_length=MAX_TOKEN_LIST)]
StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_SEQUENCES)]


class SamplingParamError(ValueError):
    """An invalid sampling parameter; `param` is the OpenAI request field to blame."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class _Ranges(BaseModel):
    """The ranges of SamplingParams' fields (the dataclass stays plain: it is read in the step loop)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: Choices
    temperature: Temperature
    top_p: TopP
    top_k: TopK
    min_p: MinP
    seed: Seed | None
    presence_penalty: Penalty
    frequency_penalty: Penalty
    repetition_penalty: RepetitionPenalty
    max_tokens: MaxTokens | None
    min_tokens: MinTokens
    stop: StopList
    stop_token_ids: TokenIdList
    ignore_eos: bool
    include_stop_str_in_output: bool
    logprobs: bool
    top_logprobs: TopLogprobs
    prompt_logprobs: TopLogprobs | None
    skip_special_tokens: bool
    logit_bias: Annotated[dict[TokenId, LogitBias], Field(max_length=MAX_TOKEN_LIST)]
    guide: Guide | None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


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
    max_tokens: int | None = None  # None: up to the context length (and the server's per-request limit)
    min_tokens: int = 0  # the first min_tokens tokens never end the answer by EOS, a stop token or stop string
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # a matched stop string stays at the end of the text
    logprobs: bool = False
    top_logprobs: int = 0
    # Logprobs of the prompt's own tokens with this many alternatives each (None: not computed). The
    # prompt is then computed in full once (no prefix-cache hit for the first choice).
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)
    guide: Guide | None = None  # a grammar the output must match (structured outputs, forced tool calls)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k == -1:
            self.top_k = 0
        if self.top_p == 0:  # a nucleus of no mass keeps only the most likely token: greedy
            self.temperature, self.top_p = 0.0, 1.0

    def validate(self) -> None:
        try:
            _Ranges.model_validate({f.name: getattr(self, f.name) for f in fields(self)})
        except ValidationError as exc:
            error = exc.errors()[0]
            param = str(error["loc"][0]) if error["loc"] else "top_logprobs"
            raise SamplingParamError(f"{param}: {error['msg']}", param) from None
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamError(f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})",
                                     "min_tokens")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
