"""OpenAI requests as the engine server sees them, and the OpenAI error body.

Parsing and validation are `engine.schema`'s (shared with the gateway); this module turns a validated
request into what the server needs (template messages or a prompt, SamplingParams) and every refusal
into an APIError naming its field.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine import schema
from engine.embedding_scheduler import EmbeddingParams
from engine.sampling_params import SamplingParams


class APIError(Exception):
    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, param=param, code=code)


@dataclass
class ParsedRequest:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    cache_salt: str | None
    user: str | None
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions: the first (usually only) prompt
    prompts: list[str | list[int]] | None = None  # completions: every prompt, one engine request each
    echo: bool = False
    tools: list[dict] | None = None  # chat: the tool definitions the prompt shows
    tool_names: set[str] | None = None  # chat: the functions whose calls are read from the answer (None: no tools)
    tool_format: str | None = None  # chat: "auto" or "hermes" (None: the server's --tool-format)
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field: alternatives shown per prompt token
    continuous_usage: bool = False  # vLLM's continuous_usage_stats: the usage so far on every chunk


def _parsed(request: schema._GenerationRequest, defaults: dict | None, **fields) -> ParsedRequest:
    return ParsedRequest(model=request.model, params=request.sampling_params(defaults), stream=bool(request.stream),
                         include_usage=request.include_usage,
                         continuous_usage=request.continuous_usage, cache_salt=request.cache_salt, user=request.user,
                         prompt_logprobs=request.prompt_logprobs, **fields)


def _validated(parse, body):
    try:
        return parse(body)
    except schema.RequestError as exc:
        raise invalid(exc.message, exc.param, exc.code) from None


def parse_chat_request(body, defaults: dict | None = None) -> ParsedRequest:
    request = _validated(schema.parse_chat, body)
    names = {t.function.name for t in request.callable_tools()} or None
    return _parsed(request, defaults, messages=request.template_messages(), tools=request.template_tools(),
                   tool_names=names, tool_format=request.tool_format)


def parse_completion_request(body, defaults: dict | None = None) -> ParsedRequest:
    request = _validated(schema.parse_completion, body)
    prompts = request.prompt_list()
    return _parsed(request, defaults, prompt=prompts[0], prompts=prompts, echo=bool(request.echo))


@dataclass
class ParsedEmbedding:
    model: str
    inputs: list[str | list[int]]
    params: EmbeddingParams
    encoding_format: str  # "float" or "base64"
    single: bool  # one bare input: its errors name `input`


def parse_embedding_request(body) -> ParsedEmbedding:
    request = _validated(schema.parse_embedding, body)
    return ParsedEmbedding(request.model, request.inputs(), EmbeddingParams(dimensions=request.dimensions),
                           request.encoding_format or "float", request.single)
