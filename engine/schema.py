"""The OpenAI request bodies we accept, as one schema shared by the engine server and the gateway.

Every field is checked for type and range here (pydantic, strict: no "1" for 1, no true for 1, no NaN),
so a bad value is refused with a 400 naming it before anything reaches the step loop. Ranges of the
sampling knobs come from `engine.sampling_params`, the one place they are written. What depends on the
model (vocabulary size, context length, the server's per-request token limit) is checked by the engine
when the model is known (`LLMEngine.check_prompt`).

Structured outputs (`response_format`) and tools (`tools`, `tool_choice`, messages' `tool_calls`) become a
`Guide` (`engine.guides`) on the SamplingParams: the grammar the engine constrains decoding with.
Fields that would change the answer and that we do not implement are refused with a 400 naming them,
unless they carry their neutral value (`functions: []`, null, ...).
Fields that do not change the answer (`user`, `metadata`, `store: false`, `service_tier`, ...) are accepted.
This module imports neither torch nor Django.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from pydantic_core import from_json

from engine.guides import Guide, choice_guide, grammar_guide, json_guide, regex_guide, tool_calls_guide
from engine.sampling_params import (
    MAX_TOKEN_LIST,
    Choices,
    LogitBias,
    MaxTokens,
    MinP,
    MinTokens,
    Penalty,
    RepetitionPenalty,
    SamplingParams,
    Seed,
    StopList,
    StopString,
    Temperature,
    TokenId,
    TokenIdList,
    TopK,
    TopLogprobs,
    TopP,
)
from engine.tools import tools_system_text

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
# What the default tool format writes around each call in the history: <tool_call>, {"name": , "arguments": }
TOOL_CALL_WRAPPING = '<tool_call>\n{"name": "", "arguments": }\n</tool_call>\n'
TOOL_RESPONSE_WRAPPING = "<tool_response>\n\n</tool_response>"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
MAX_CHOICES = 128  # n x the number of prompts of one completions request (one sequence each)
MAX_GUIDE_LENGTH = 65536  # characters of a guided_regex / guided_grammar / guided_json text
MAX_GUIDED_CHOICES = 1024
# How tools reach the prompt (`engine.tools`): "auto" uses the chat template when it supports tools and
# the default Hermes-style format otherwise; "hermes" always uses the default format.
TOOL_FORMATS = ("auto", "hermes")
# What every model this engine serves can do, as /v1/models reports it (engine server and gateway).
CAPABILITIES = {"tools": True, "json_schema": True, "json_object": True}


class RequestError(ValueError):
    """A request the API refuses: the message, the field to blame (`messages[1].content` style) and a code."""

    def __init__(self, message: str, param: str | None = None, code: str | None = "invalid_value"):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


# Known OpenAI fields that change the answer and are not implemented, with the values that leave the
# answer unchanged (those are accepted and dropped).
_NEUTRAL: dict[str, Any] = {
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
    "function_call": lambda v: v is None,
    "audio": lambda v: v is None,
    "annotations": lambda v: v is None or v == [],
}
# Tools belong to chat: on legacy completions only their neutral values are accepted.
_COMPLETION_NEUTRAL: dict[str, Any] = {
    **_NEUTRAL,
    "tools": lambda v: v is None or v == [],
    "tool_choice": lambda v: v is None or v == "none",
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),  # means nothing without tools
}
_WHY = {
    "tools": "tools are a chat completions feature (POST /v1/chat/completions)",
    "tool_choice": "tools are a chat completions feature (POST /v1/chat/completions)",
    "parallel_tool_calls": "tools are a chat completions feature (POST /v1/chat/completions)",
    "functions": "the deprecated functions API is not available: use 'tools'",
    "function_call": "the deprecated functions API is not available: use 'tool_choice'",
    "audio": "audio is not available on this server",
    "modalities": "only text output is available",
    "prediction": "predicted outputs are not available on this server",
    "store": "stored completions are not available on this server",
    "suffix": "insertion (suffix) is not available on this server",
    "best_of": "best_of other than 1 is not available on this server",
}

# What a field must be, for type errors on fields whose type is a union.
_SHAPES = {
    "stop": "a non-empty string or an array of at most 4 non-empty strings, each at most 1024 characters",
    "prompt": "a non-empty string, an array of token ids, or a non-empty array of those",
    "content": "a string or an array of text parts",
    "logit_bias": "an object mapping token ids to numbers between -100 and 100",
    "tool_choice": "'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}",
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


_FunctionName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionCall(_Strict):
    name: _FunctionName
    arguments: str  # JSON text, as the model wrote it


class ToolCall(_Strict):
    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"]
    function: FunctionCall


class FunctionDefinition(_Strict):
    name: _FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: any object
    strict: bool | None = None  # arguments are always constrained when the call is forced


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: _FunctionName


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Strict):
    name: _FunctionName
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None  # the output is constrained either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class Message(_Strict):
    role: Literal[CHAT_ROLES]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None
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
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        return message

    def prompt_bytes(self) -> int:
        """Bytes of everything of this message a template renders (an upper bound on its tokens)."""
        fields = (self.text(), self.role, self.name, self.tool_call_id)
        calls = sum(len(c.id) + len(c.function.name) + len(c.function.arguments.encode()) + len(TOOL_CALL_WRAPPING)
                    for c in self.tool_calls or ())
        wrapping = len(TOOL_RESPONSE_WRAPPING) if self.role == "tool" else 0
        return sum(len(v.encode()) for v in fields if v) + calls + wrapping


GuideText = Annotated[str, Field(min_length=1, max_length=MAX_GUIDE_LENGTH)]
GuidedJSON = dict[str, Any] | GuideText  # a JSON schema, or its JSON text (vLLM accepts both)
GuidedChoice = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_GUIDED_CHOICES)]


class StructuredOutputs(_Strict):
    """vLLM's `structured_outputs` object: one of a JSON schema, a regular expression, a choice among
    strings, a Lark grammar (llguidance's dialect) or any JSON object."""

    json_: GuidedJSON | None = Field(None, alias="json")
    regex: GuideText | None = None
    choice: GuidedChoice | None = None
    grammar: GuideText | None = None
    json_object: bool | None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # we add no obfuscation field either way
    # vLLM's: every chunk with choices carries the usage so far (the gateway asks for it, so that a cut
    # stream is billed what the engine reported: its cached tokens too)
    continuous_usage_stats: bool | None = None


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
    logit_bias: Annotated[dict[_LaxTokenId, LogitBias], Field(max_length=MAX_TOKEN_LIST)] | None = None
    response_format: ResponseFormat | None = None
    # Accepted, and they do not change the answer.
    user: str | None = None
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
                        Field(max_length=16)] | None = None  # OpenAI's bounds
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Extensions (as vLLM names them).
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool | None = None
    min_tokens: MinTokens | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: TokenIdList | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: TopLogprobs | None = None  # logprobs of the prompt's tokens, with this many alternatives
    # Output constraints as vLLM names them (the same machinery as response_format; one constraint at most)
    structured_outputs: StructuredOutputs | None = None
    guided_json: GuidedJSON | None = None
    guided_regex: GuideText | None = None
    guided_choice: GuidedChoice | None = None
    guided_grammar: GuideText | None = None
    cache_salt: Annotated[str, Field(min_length=1)] | None = None  # set by the gateway per organization

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """The usage so far on every chunk (vLLM's continuous_usage_stats, with include_usage)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)

    @property
    def max_completion(self) -> int | None:
        """The client's bound on tokens per choice (None: up to the context and the server's limit)."""
        return self.max_tokens

    def _check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise RequestError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                               "stream_options")
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is None:
            raise RequestError("Missing required parameter: 'response_format.json_schema'.",
                               "response_format.json_schema", "missing_required_parameter")
        if fmt is not None and fmt.type != "json_schema" and fmt.json_schema is not None:
            raise RequestError(f"'response_format.json_schema' is only allowed with type 'json_schema', not {fmt.type!r}.",
                               "response_format.json_schema")
        if self.min_tokens and self.max_completion is not None and self.min_tokens > self.max_completion:
            raise RequestError(f"'min_tokens' ({self.min_tokens}) must be at most the maximum number of tokens to "
                               f"generate ({self.max_completion}).", "min_tokens")
        if self.prompt_logprobs is not None and self.stream:
            raise RequestError("'prompt_logprobs' is not available with 'stream': ask for a non-streamed answer.",
                               "prompt_logprobs")
        self.guided()  # refuses conflicting or malformed constraints here, as a 400

    def guided(self) -> Guide | None:
        """The guide of vLLM's `guided_*` / `structured_outputs` fields: at most one of them, and not
        together with a JSON `response_format`."""
        options = [("guided_json", self.guided_json), ("guided_regex", self.guided_regex),
                   ("guided_choice", self.guided_choice), ("guided_grammar", self.guided_grammar)]
        so = self.structured_outputs
        if so is not None:
            options += [("structured_outputs.json", so.json_), ("structured_outputs.regex", so.regex),
                        ("structured_outputs.choice", so.choice), ("structured_outputs.grammar", so.grammar),
                        ("structured_outputs.json_object", so.json_object or None)]
        given = [(param, value) for param, value in options if value is not None]
        if not given:
            return None
        if len(given) > 1 or self.answer_schema() is not False:
            clash = given[1][0] if len(given) > 1 else "response_format"
            raise RequestError(f"Only one output constraint may be given: '{given[0][0]}' cannot be combined with "
                               f"'{clash}'.", clash)
        param, value = given[0]
        kind = param.rsplit(".", 1)[-1].removeprefix("guided_")
        if kind == "json":
            return json_guide(_schema_object(value, param), param)
        if kind == "json_object":
            return json_guide(None, param)
        if kind == "regex":
            return regex_guide(value, param)
        if kind == "choice":
            return choice_guide(value, param)
        return grammar_guide(value, param)

    def answer_schema(self) -> dict | None | bool:
        """The JSON schema the answer must match: a dict, None for any JSON object, False for free text."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return False
        return fmt.json_schema.schema_ if fmt.type == "json_schema" else None

    def guide(self) -> Guide | None:
        schema = self.answer_schema()
        if schema is False:
            return self.guided()
        return json_guide(schema)

    def prompt_logprobs_wanted(self) -> int | None:
        """How many alternatives the engine computes for each prompt token (None: no prompt logprobs)."""
        return self.prompt_logprobs

    def sampling_params(self, defaults: dict | None = None, **extra) -> SamplingParams:
        """The engine's SamplingParams: the request's values over the model's generation defaults."""
        kwargs = {k: v for k, v in (defaults or {}).items()
                  if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        for name in ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids",
                     "skip_special_tokens", "logit_bias", "stop", "min_tokens", "include_stop_str_in_output"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        kwargs["max_tokens"] = self.max_completion
        return SamplingParams(**kwargs, guide=self.guide(), prompt_logprobs=self.prompt_logprobs_wanted(), **extra)


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    tool_format: Literal[TOOL_FORMATS] | None = None  # extension: set by the gateway from the catalog

    @property
    def max_completion(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_mode(self) -> str:
        """"none" (no tools, or tool_choice none), "auto", "required", or "named"."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def callable_tools(self) -> list[Tool]:
        """The tools the model may call in this answer."""
        if self.tool_mode == "none":
            return []
        if self.tool_mode == "named":
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return list(self.tools)

    def guide(self) -> Guide | None:
        mode = self.tool_mode
        if mode == "none" or (mode == "auto" and self.answer_schema() is False):
            return super().guide()  # free text (auto: tool calls are parsed, not forced)
        functions = [(t.function.name, t.function.parameters) for t in self.callable_tools()]
        if mode == "auto":  # a JSON answer or tool calls
            return tool_calls_guide(functions, parallel=self.parallel_tool_calls is not False,
                                    answer=self.answer_schema() or {"type": "object"})
        return tool_calls_guide(functions, parallel=mode == "required" and self.parallel_tool_calls is not False,
                                param="tool_choice" if mode == "named" else "tools")

    def template_tools(self) -> list[dict] | None:
        """The tool definitions the prompt shows (none with tool_choice none)."""
        if self.tool_mode == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def prompt_bytes(self) -> int:
        """An upper bound on the bytes the template renders besides its own markers: every message field
        and the tool definitions with the default tool format's instructions."""
        tools = self.template_tools()
        return (sum(m.prompt_bytes() for m in self.messages)
                + (len(tools_system_text(tools).encode()) if tools else 0))

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
            if message.tool_calls and message.role != "assistant":
                raise RequestError(f"Only assistant messages carry 'tool_calls', not {message.role!r} ones.",
                                   f"messages[{i}].tool_calls")
            if message.role == "tool" and message.tool_call_id is None:
                raise RequestError(f"Missing required parameter: 'messages[{i}].tool_call_id'.",
                                   f"messages[{i}].tool_call_id", "missing_required_parameter")
        guided = self.guided()
        if guided is not None and self.tool_mode != "none":
            raise RequestError(f"'{guided.param}' cannot be combined with 'tools' (a tool call is itself constrained "
                               "output); use 'response_format' with tool_choice 'auto'.", guided.param)
        names = [t.function.name for t in self.tools or ()]
        if len(set(names)) != len(names):
            raise RequestError("Tool function names must be unique.", "tools")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise RequestError("'tool_choice' is only allowed when 'tools' are specified.", "tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise RequestError(f"'tool_choice' names the function {self.tool_choice.function.name!r}, which is not "
                               "in 'tools'.", "tool_choice.function.name")

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

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts, one engine request each (a batch of one is a plain prompt after `_check`)."""
        prompt = self.prompt
        return list(prompt) if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else [prompt]

    def _check(self) -> None:
        super()._check()
        prompt = self.prompt
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], (str, list))):
            empty = next((i for i, p in enumerate(prompt) if not p), None)
            if not prompt or empty is not None:
                raise RequestError(f"'prompt' must be {_SHAPES['prompt']}.",
                                   "prompt" if empty is None else f"prompt[{empty}]")
            if len(prompt) * (self.n or 1) > MAX_CHOICES:
                raise RequestError(f"n x the number of prompts is {len(prompt) * (self.n or 1)}, over the limit of "
                                   f"{MAX_CHOICES} choices per request: send fewer prompts or a smaller n.", "prompt")
            if len(prompt) == 1:
                self.prompt = prompt[0]  # a batch of one

    def sampling_params(self, defaults: dict | None = None) -> SamplingParams:
        return super().sampling_params(defaults, logprobs=self.logprobs is not None,
                                       top_logprobs=self.logprobs or 0)

    def prompt_logprobs_wanted(self) -> int | None:
        """`prompt_logprobs`, or with `echo` and `logprobs` the echoed prompt's logprobs: the larger."""
        echoed = self.logprobs if self.echo and self.logprobs is not None else None
        wanted = [k for k in (self.prompt_logprobs, echoed) if k is not None]
        return max(wanted) if wanted else None


def _schema_object(value: dict | str, param: str) -> dict:
    """A guided_json schema given as an object or as JSON text."""
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except ValueError as exc:
        raise RequestError(f"'{param}' is not valid JSON: {exc}.", param) from None
    if not isinstance(schema, dict):
        raise RequestError(f"'{param}' must be a JSON schema object.", param)
    return schema


# -- /v1/embeddings ------------------------------------------------------------------------------
MAX_EMBEDDING_INPUTS = 2048  # inputs per request, OpenAI's limit
# What an embeddings model reports in /v1/models (a chat model reports CAPABILITIES).
EMBEDDING_CAPABILITIES = {"embeddings": True}


class EmbeddingRequest(_Strict):
    """OpenAI's embeddings body. `input`: a string, a list of strings, a token list or a list of token lists,
    each non-empty, at most MAX_EMBEDDING_INPUTS of them (the length limit per input is the model's)."""

    model: Annotated[str, Field(min_length=1)]
    input: str | list[TokenId] | list[str] | list[list[TokenId]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None  # accepted; it does not change the answer

    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)

    @property
    def single(self) -> bool:
        """One input sent bare (a string or one token list): its errors name `input`, not `input[0]`."""
        return isinstance(self.input, str) or bool(self.input and isinstance(self.input[0], int))

    def _check(self) -> None:
        inputs = self.inputs()
        if not inputs:
            raise RequestError(f"'input' must be {_SHAPES['input']}.", "input", "invalid_type")
        if len(inputs) > MAX_EMBEDDING_INPUTS:
            raise RequestError(f"'input' has {len(inputs)} inputs, over the limit of {MAX_EMBEDDING_INPUTS} per "
                               "request: send fewer inputs per request.", "input")
        empty = next((i for i, item in enumerate(inputs) if not item), None)
        if empty is not None:
            raise RequestError("'input' cannot be an empty string or an empty token list.",
                               "input" if self.single else f"input[{empty}]")


_SHAPES["input"] = "a non-empty string, an array of token ids, or a non-empty array of those"


def parse_embedding(body: Any) -> EmbeddingRequest:
    return _validated(EmbeddingRequest, _json_object(body))


def parse_json(raw: bytes) -> Any:
    """A request body's JSON, decoded the same way by the engine server and the gateway: strict UTF-8, no
    lone surrogate escapes (no tokenizer can take them), no NaN or Infinity, nesting depth bounded."""
    try:
        return from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise RequestError(f"We could not parse the JSON body of your request ({exc}). The OpenAI API expects a "
                           "JSON payload.", None, "invalid_json") from None


def parse_chat(body: Any) -> ChatCompletionRequest:
    return _parse(ChatCompletionRequest, body)


def parse_completion(body: Any) -> CompletionRequest:
    return _parse(CompletionRequest, body)


def _parse(model: type[_GenerationRequest], body: Any) -> _GenerationRequest:
    neutral = _NEUTRAL if model is ChatCompletionRequest else _COMPLETION_NEUTRAL
    body = _drop_neutral(_json_object(body), neutral, "")
    messages = body.get("messages")
    if isinstance(messages, list):
        body["messages"] = [_drop_neutral(m, _MESSAGE_NEUTRAL, f"messages[{i}].") if isinstance(m, dict) else m
                            for i, m in enumerate(messages)]
    return _validated(model, body)


def _json_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", None, "invalid_type")
    return body


def _validated(model: type[_Strict], body: dict):
    """The body as `model`, with its own checks run; a 400 naming the field otherwise."""
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
