"""Validation of /v1/chat/completions, /v1/completions and /v1/embeddings bodies, and the token
reservation each needs.

The fields, their types and ranges are the engine's request schema (`engine.schema`): the gateway and
the engine server refuse exactly the same bodies, with the same 400 naming the field. What depends on
the model (vocabulary, context length) the engine checks, and the gateway relays its 400.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine import schema

from .errors import GatewayError

PER_MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators a chat template adds around each message


@dataclass
class InferenceRequest:
    endpoint: str  # "chat/completions", "completions" or "embeddings"
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    prompt_bound: int  # safe upper bound on prompt tokens (before the template overhead)
    max_completion_tokens: int | None
    n: int  # choices over all prompts (n x prompts on completions; inputs on embeddings)
    request: Any  # the validated body (engine.schema's request model)
    usage_endpoint: str | None = None  # the usage record's endpoint when not `endpoint` (responses: chat)
    default_max_tokens: int | None = None  # set by `reservation`: the max_tokens the gateway sends when absent

    def reservation(self, context_length: int, prompt_tokens: int | None, overhead: int, default_max_tokens: int) -> int:
        """Tokens to hold: the prompt + n × the completion's bound, never more than n × context length.

        The prompt is `prompt_tokens` when counted exactly (inference/prompt_count.py), else the byte-count
        bound plus `overhead` (it holds for byte-level BPE: every token is at least one byte). Without
        max_tokens, a counted chat prompt is held with `default_max_tokens` per choice (capped by what the
        context leaves), which the gateway then sends as max_tokens; uncounted, the whole context.
        Each choice's prompt + completion fits the context, so n × context is a bound on its own.
        """
        ceiling = self.n * context_length
        completion = self.max_completion_tokens
        if completion is None and prompt_tokens is not None and default_max_tokens:
            completion = self.default_max_tokens = max(1, min(default_max_tokens, context_length - prompt_tokens))
        if completion is None:
            return ceiling
        prompt = prompt_tokens if prompt_tokens is not None else self.prompt_bound + overhead
        if prompt_tokens is None and self.endpoint == "embeddings":
            prompt = self.prompt_bound  # no template: the bound counts the special tokens already
        return min(prompt + self.n * completion, ceiling)


def _validated(parse, body: Any):
    try:
        return parse(body)
    except schema.RequestError as exc:
        raise GatewayError(400, exc.message, "invalid_request_error", exc.code, exc.param) from None


def parse_chat(body: Any) -> InferenceRequest:
    request = _validated(schema.parse_chat, body)
    # every field the template renders (texts, names, tool calls, tool definitions and their instructions)
    prompt_bytes = request.prompt_bytes() + PER_MESSAGE_OVERHEAD_TOKENS * len(request.messages)
    return InferenceRequest("chat/completions", body, request.model, bool(request.stream), request.include_usage,
                            prompt_bytes, request.max_completion, request.n or 1, request)


def parse_completion(body: Any) -> InferenceRequest:
    request = _validated(schema.parse_completion, body)
    # several prompts: one engine request each, with n choices each; every prompt counts: token ids as they
    # are, a string by its bytes plus the special token the tokenizer may add to it
    prompts = request.prompt_list()
    prompt_bound = sum(len(p) if isinstance(p, list) else len(p.encode()) + 1 for p in prompts)
    return InferenceRequest("completions", body, request.model, bool(request.stream), request.include_usage,
                            prompt_bound, request.max_completion, (request.n or 1) * len(prompts), request)


BERT_SPECIAL_TOKENS = 2  # [CLS] and [SEP]: what an encoder's tokenizer adds around each string input


def parse_embedding(body: Any) -> InferenceRequest:
    request = _validated(schema.parse_embedding, body)
    # Each input's tokens: token ids as they are; a string at most one token per byte (WordPiece and
    # byte-level BPE pieces each cover at least one byte) plus the special tokens around it. Nothing is
    # generated (max completion 0), and no input may exceed the context: n x context bounds it too.
    inputs = request.inputs()
    prompt_bound = sum(len(x) if isinstance(x, list) else len(x.encode()) + BERT_SPECIAL_TOKENS for x in inputs)
    return InferenceRequest("embeddings", body, request.model, False, False, prompt_bound, 0, len(inputs), request)
