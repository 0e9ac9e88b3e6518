"""Validation of /v1/chat/completions and /v1/completions bodies against the part of the OpenAI schema
we support, and the token reservation each request needs.

Invalid values raise a 400 with `param` naming the field (`messages[1].content` style paths).
Fields not listed here pass through untouched: the engine accepts extensions (top_k, min_p, ...) and
rejects what it does not know.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError, invalid_param

CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for the legacy completions endpoint
PER_MESSAGE_OVERHEAD_TOKENS = 8  # role markers and separators a chat template adds around each message


@dataclass
class InferenceRequest:
    endpoint: str  # "chat/completions" or "completions"
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client asked for the usage chunk
    prompt_bound: int  # safe upper bound on prompt tokens (before the template overhead)
    max_completion_tokens: int | None
    n: int

    def reservation(self, context_length: int, overhead: int) -> int:
        """Tokens to hold: prompt bound + n × max completion, never more than n × context length.

        Each choice's prompt + completion fits the context, so n × context is a bound on its own;
        the byte-count prompt bound holds for byte-level BPE (every token is at least one byte).
        """
        ceiling = self.n * context_length
        if self.max_completion_tokens is None:
            return ceiling
        return min(self.prompt_bound + overhead + self.n * self.max_completion_tokens, ceiling)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(body: dict, name: str, low: float, high: float) -> None:
    value = body.get(name)
    if value is None:
        return
    if not _is_number(value):
        raise invalid_param(name, f"'{name}' must be a number, got {json.dumps(value)}.")
    if not low <= value <= high:
        raise invalid_param(name, f"{value} is not a valid value for '{name}': expected a number between {low:g} and {high:g}.")


def _integer(body: dict, name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise invalid_param(name, f"'{name}' must be an integer, got {json.dumps(value)}.")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise invalid_param(name, f"{value} is not a valid value for '{name}': expected an integer {bound}.")
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid_param(name, f"'{name}' must be a boolean, got {json.dumps(value)}.")
    return value


def _typed(body: dict, name: str, kind: type | tuple, label: str) -> None:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        raise invalid_param(name, f"'{name}' must be {label}.")


def _stop(body: dict) -> None:
    stop = body.get("stop")
    if stop is None or isinstance(stop, str):
        return
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise invalid_param("stop", "'stop' must be a string or an array of strings.")
    if len(stop) > 4:
        raise invalid_param("stop", "'stop' accepts at most 4 sequences.")


def _logit_bias(body: dict) -> None:
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise invalid_param("logit_bias", "'logit_bias' must be an object mapping token ids to numbers.")
    for token, value in bias.items():
        if not str(token).isdigit() or not _is_number(value) or not -100 <= value <= 100:
            raise invalid_param("logit_bias", "'logit_bias' maps token ids to numbers between -100 and 100.")


def _common(body: dict) -> tuple[str, bool, bool, int]:
    model = body.get("model")
    if model is None:
        raise GatewayError(400, "You must provide a model parameter.", code="missing_required_parameter", param="model")
    if not isinstance(model, str) or not model:
        raise invalid_param("model", "'model' must be a non-empty string.")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise invalid_param("stream_options", "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
        if not isinstance(options, dict):
            raise invalid_param("stream_options", "'stream_options' must be an object.")
        include_usage = _boolean(options, "include_usage")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    n = _integer(body, "n", 1, 128) or 1
    _integer(body, "seed", -(2**63), 2**64 - 1)
    _typed(body, "user", str, "a string")
    _stop(body)
    _logit_bias(body)
    return model, stream, include_usage, n


def _content_bytes(content: Any, param: str) -> int:
    if isinstance(content, str):
        return len(content.encode())
    if isinstance(content, list):
        total = 0
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid_param(f"{param}[{j}]", "Only text content parts ({\"type\": \"text\", \"text\": ...}) are supported.")
            total += len(part["text"].encode())
        return total
    raise invalid_param(param, "Message content must be a string or an array of text parts.")


def parse_chat(body: Any) -> InferenceRequest:
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    model, stream, include_usage, n = _common(body)
    messages = body.get("messages")
    if messages is None:
        raise GatewayError(400, "Missing required parameter: 'messages'.", code="missing_required_parameter", param="messages")
    if not isinstance(messages, list) or not messages:
        raise invalid_param("messages", "'messages' must be a non-empty array.")
    prompt_bytes = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_param(f"messages[{i}]", "Each message must be an object.")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid_param(f"messages[{i}].role", f"Invalid role {json.dumps(role)}: expected one of {sorted(CHAT_ROLES)}.")
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise GatewayError(400, f"Missing required parameter: 'messages[{i}].content'.",
                                   code="missing_required_parameter", param=f"messages[{i}].content")
        else:
            prompt_bytes += _content_bytes(content, f"messages[{i}].content")
        if "name" in message and not isinstance(message["name"], str):
            raise invalid_param(f"messages[{i}].name", "'name' must be a string.")
        prompt_bytes += len(role) + PER_MESSAGE_OVERHEAD_TOKENS
        for extra in ("tool_calls", "tool_call_id", "name"):
            if extra in message:
                prompt_bytes += len(json.dumps(message[extra]).encode())
    for name in ("tools", "functions", "response_format"):
        if name in body:
            prompt_bytes += len(json.dumps(body[name]).encode())
    max_tokens = _integer(body, "max_tokens", 1)
    max_completion = _integer(body, "max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise invalid_param("max_tokens", "Set either 'max_tokens' or 'max_completion_tokens', not both.")
    _boolean(body, "logprobs")
    _integer(body, "top_logprobs", 0, 20)
    _typed(body, "tools", list, "an array")
    _typed(body, "response_format", dict, "an object")
    return InferenceRequest(
        "chat/completions", body, model, stream, include_usage, prompt_bytes,
        max_completion if max_completion is not None else max_tokens, n,
    )


def parse_completion(body: Any) -> InferenceRequest:
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    model, stream, include_usage, n = _common(body)
    prompt = body.get("prompt")
    if prompt is None:
        raise GatewayError(400, "Missing required parameter: 'prompt'.", code="missing_required_parameter", param="prompt")
    if isinstance(prompt, str):
        prompt_bound = len(prompt.encode())
    elif isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        prompt_bound = len(prompt)
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt_bound = len(prompt[0].encode())
    else:
        raise invalid_param("prompt", "'prompt' must be a string or an array of token ids (batched prompts are not supported).")
    max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None:
        body["max_tokens"] = max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
    _boolean(body, "echo")
    _integer(body, "logprobs", 0, 5)
    _integer(body, "best_of", 1, 20)
    _typed(body, "suffix", str, "a string")
    return InferenceRequest("completions", body, model, stream, include_usage, prompt_bound, max_tokens, n)
