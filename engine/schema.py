"""The OpenAI request bodies we accept, as one schema shared by the engine server and the gateway.

Every field is checked for type and range here (pydantic, strict: no "1" for 1, no true for 1, no NaN),
so a bad value is refused with a 400 naming it before anything reaches the step loop. Ranges of the
sampling knobs come from `engine.sampling_params`, the one place they are written. What depends on the
model (vocabulary size, context length, the server's per-request token limit) is checked by the engine
when the model is known (`LLMEngine.check_prompt`).

Fields that would change the answer and that we do not implement are refused with a 400 naming them,
unless they carry their neutral value (`response_format: {"type": "text"}`, `tools: []`, null, ...).
Fields that do not change the answer (`user`, `metadata`, `store: false`, `service_tier`, ...) are accepted.
This module imports neither torch nor Django.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator

from engine.sampling_params import (
    Choices,
    LogitBias,
    MaxTokens,
    MinP,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopList,
    StopString,
    Temperature,
    TokenId,
    TopK,
    TopLogprobs,
    TopP,
)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint


class RequestError(ValueError):
    """A request the API refuses: the message, the field to blame (`messages[1].content` style) and a code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# Known OpenAI fields that change the answer and are not implemented, with the values that leave the
# answer unchanged (those are accepted and dropped).
_NEUTRAL: dict[str, Any] = {
    "response_format": lambda v: v is None or v == {"type": "text"},
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),  # means nothing without tools
    "functions": lambda v: v is None or v == [],
    "function_call": lambda v: v is None or v == "none",
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
    "prediction": lambda v: v is None,
    "reasoning_effort": lambda v: v is None,
    "verbosity": lambda v: v is None,
    "web_search_options": lambda v: v is None,
    "moderation": lambda v: v is None,
    "store": lambda v: v is None or v is False,
    "suffix": lambda v: v is None or v == "",
    "best_of": lambda v: v is None or v == 1,
}
_MESSAGE_NEUTRAL: dict[str, Any] = {
    "tool_calls": lambda v: v is None or v == [],
    "function_call": lambda v: v is None,
    "audio": lambda v: v is None,
    "annotations": lambda v: v is None or v == [],
}
_WHY = {
    "response_format": "structured outputs are not available on this server yet",
    "tools": "tool calling is not available on this server yet",
    "tool_choice": "tool calling is not available on this server yet",
    "functions": "function calling is not available on this server yet",
    "function_call": "function calling is not available on this server yet",
    "tool_calls": "tool calling is not available on this server yet",
    "audio": "audio is not available on this server",
    "modalities": "only text output is available",
    "prediction": "predicted outputs are not available on this server",
    "store": "stored completions are not available on this server",
    "suffix": "insertion (suffix) is not available on this server",
    "best_of": "best_of other than 1 is not available on this server",
}

# What a field must be, for type errors on fields whose type is a union.
_SHAPES = {
    "stop": "a non-empty string or an array of at most 4 non-empty strings",
    "prompt": "a non-empty string, an array of token ids, or an array holding one of those",
    "content": "a string or an array of text parts",
    "logit_bias": "an object mapping token ids to numbers between -100 and 100",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(_Strict):
    type: str
    text: str

    @field_validator("type")
    @classmethod
    def _only_text(cls, value: str) -> str:
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported: only 'text'")
        return value


class Message(_Strict):
    role: Literal[CHAT_ROLES]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self) -> str | None:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content

    def for_template(self) -> dict:
        message = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # we add no obfuscation field either way


_LaxTokenId = Annotated[TokenId, Strict(False)]  # JSON object keys are strings: "50256"


class _GenerationRequest(_Strict):
    """Fields common to chat and legacy completions (OpenAI's, then vLLM-style extensions)."""

    model: Annotated[str, Field(min_length=1)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: Choices | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    stop: StopString | StopList | None = None
    max_tokens: MaxTokens | None = None
    logit_bias: dict[_LaxTokenId, LogitBias] | None = None
    # Accepted, and they do not change the answer.
    user: str | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Extensions (as vLLM names them).
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: bool | None = None
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # set by the gateway per organization

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def max_completion(self) -> int | None:
        """The client's bound on tokens per choice (None: up to the context and the server's limit)."""
        return self.max_tokens

    def _check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                               "stream_options")

    def sampling_params(self, defaults: dict | None = None, **extra) -> SamplingParams:
        """The engine's SamplingParams: the request's values over the model's generation defaults."""
        kwargs = {k: v for k, v in (defaults or {}).items()
                  if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        for name in ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids",
                     "skip_special_tokens", "logit_bias", "stop"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        kwargs["max_tokens"] = self.max_completion
        return SamplingParams(**kwargs, **extra)


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None

    @property
    def max_completion(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def _check(self) -> None:
        super()._check()
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise RequestError("Set either 'max_tokens' or 'max_completion_tokens', not both.", "max_tokens")
        if self.top_logprobs and not self.logprobs:
            raise RequestError("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
        for i, message in enumerate(self.messages):
            if message.content is None and message.role != "assistant":
                raise RequestError(f"Missing required parameter: 'messages[{i}].content'.",
                                   f"messages[{i}].content", "missing_required_parameter")

    def template_messages(self) -> list[dict]:
        return [m.for_template() for m in self.messages]

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        return super().sampling_params(defaults, logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0)


class CompletionRequest(_GenerationRequest):
    prompt: (Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
             | list[str] | list[list[TokenId]])
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None

    @property
    def max_completion(self) -> int:
        return self.max_tokens if self.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS

    def _check(self) -> None:
        super()._check()
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise RequestError("Batches of several prompts are not supported: send one prompt per request.",
                                   "prompt")
            if not prompt[0]:
                raise RequestError(f"'prompt' must be {_SHAPES['prompt']}.", "prompt")
            self.prompt = prompt[0]  # a batch of one

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        return super().sampling_params(defaults, logprobs=self.logprobs is not None,
                                       top_logprobs=self.logprobs or 0)


def parse_chat(body: Any) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def parse_completion(body: Any) -> CompletionRequest:
    return _parse(CompletionRequest, body)


def _parse(model: type[_GenerationRequest], body: Any) -> _GenerationRequest:
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", None, "invalid_type")
    body = _drop_neutral(body, _NEUTRAL, "")
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [_drop_neutral(m, _MESSAGE_NEUTRAL, f"messages[{i}].") if isinstance(m, dict) else m
                            for i, m in enumerate(messages)]
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        raise _request_error(exc) from None
    request._check()
    return request


def _drop_neutral(body: dict, neutral: dict, prefix: str) -> dict:
    """A copy without the unimplemented fields that hold their neutral value; 400 for any other value."""
    out = {}
    for key, value in body.items():
        accepts = neutral.get(key)
        if accepts is None:
            out[key] = value
        elif not accepts(value):
            why = _WHY.get(key, "it is not available on this server")
            raise RequestError(f"'{prefix}{key}' is not supported: {why}.", f"{prefix}{key}", "unsupported_parameter")
    return out


def _param(loc: tuple) -> str | None:
    """('messages', 1, 'content', 'list[TextPart]', 0, 'type') -> 'messages[1].content[0].type'."""
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif "[" in part or "-" in part or part in ("str", "int", "float", "bool", "none"):
            continue  # a union member's tag, not a field
        else:
            param += f".{part}" if param else part
        if param in ("logit_bias", "metadata"):
            break  # a map: its keys are data
    return param or None


def _request_error(exc: ValidationError) -> RequestError:
    errors = exc.errors(include_url=False)
    # Our own checks (value_error) say more than the type errors of the other members of a union.
    error = next((e for e in errors if e["type"] == "value_error"), errors[0])
    param = _param(error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return RequestError(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return RequestError(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    field = (param or "").rsplit(".", 1)[-1].split("[", 1)[0]
    if field in _SHAPES and kind != "value_error" and (kind.endswith("_type") or len(errors) > 1):
        return RequestError(f"'{param}' must be {_SHAPES[field]}.", param, "invalid_type")
    value = error.get("input")
    shown = "" if isinstance(value, (dict, list)) else f"{_short(value)} is not a valid value for '{param}': "
    message = error["msg"].removeprefix("Value error, ")
    message = message[0].lower() + message[1:]
    return RequestError(f"{shown or f'Invalid {param!r}: '}{message}.", param, "invalid_value")


def _short(value: Any) -> str:
    import json

    text = json.dumps(value) if isinstance(value, (str, bool)) or value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
