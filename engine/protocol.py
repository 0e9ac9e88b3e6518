"""OpenAI request parsing and the OpenAI error body; every bad input becomes an APIError naming its field."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import SamplingParamError, SamplingParams


class APIError(Exception):
    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, param=param, code=code)


# Request field -> (SamplingParams field, accepted Python types)
_NUMBER = (int, float)
_SAMPLING_FIELDS = {
    "temperature": ("temperature", _NUMBER),
    "top_p": ("top_p", _NUMBER),
    "top_k": ("top_k", (int,)),
    "min_p": ("min_p", _NUMBER),
    "seed": ("seed", (int,)),
    "presence_penalty": ("presence_penalty", _NUMBER),
    "frequency_penalty": ("frequency_penalty", _NUMBER),
    "repetition_penalty": ("repetition_penalty", _NUMBER),
    "n": ("n", (int,)),
    "ignore_eos": ("ignore_eos", (bool,)),
    "stop_token_ids": ("stop_token_ids", (list,)),
    "skip_special_tokens": ("skip_special_tokens", (bool,)),
}


@dataclass
class ParsedRequest:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    cache_salt: str | None
    user: str | None
    messages: list[dict] | None = None  # chat
    prompt: str | list[int] | None = None  # completions
    echo: bool = False


def _check_type(body: dict, key: str, types: tuple, what: str) -> None:
    value = body.get(key)
    if value is None:
        return
    if isinstance(value, bool) and bool not in types:
        raise invalid(f"'{key}' must be {what}", key)
    if not isinstance(value, types):
        raise invalid(f"'{key}' must be {what}", key)


def _sampling_params(body: dict, *, chat: bool, defaults: dict) -> SamplingParams:
    kwargs = {}
    for key, value in defaults.items():
        if key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            kwargs[key] = value
    for key, (field, types) in _SAMPLING_FIELDS.items():
        if body.get(key) is not None:
            _check_type(body, key, types, "a number" if types is _NUMBER else f"of type {types[0].__name__}")
            kwargs[field] = body[key]
    max_tokens_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    if body.get(max_tokens_key) is not None:
        _check_type(body, max_tokens_key, (int,), "an integer")
        kwargs["max_tokens"] = body[max_tokens_key]
    stop = body.get("stop")
    if stop is not None:
        if not isinstance(stop, (str, list)) or (isinstance(stop, list) and not all(isinstance(s, str) for s in stop)):
            raise invalid("'stop' must be a string or a list of strings", "stop")
        kwargs["stop"] = stop
    if chat:
        _check_type(body, "logprobs", (bool,), "a boolean")
        _check_type(body, "top_logprobs", (int,), "an integer")
        if body.get("logprobs"):
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = body.get("top_logprobs") or 0
        elif body.get("top_logprobs"):
            raise invalid("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
    elif body.get("logprobs") is not None:
        _check_type(body, "logprobs", (int,), "an integer")
        if not 0 <= body["logprobs"] <= 5:
            raise invalid("'logprobs' must be between 0 and 5", "logprobs")
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = body["logprobs"]
    try:
        params = SamplingParams(**kwargs)
    except SamplingParamError as exc:
        param = "max_completion_tokens" if exc.param == "max_tokens" and max_tokens_key != "max_tokens" \
            else exc.param
        raise invalid(str(exc), param) from None
    return params


def _common(body, *, chat: bool, defaults: dict) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required", "model")
    _check_type(body, "stream", (bool,), "a boolean")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid("'stream_options' must be an object", "stream_options")
    if options and not body.get("stream"):
        raise invalid("'stream_options' is only allowed when 'stream' is true", "stream_options")
    _check_type(body, "cache_salt", (str,), "a string")
    if body.get("cache_salt") == "":
        raise invalid("'cache_salt' must be a non-empty string", "cache_salt")
    _check_type(body, "user", (str,), "a string")
    return {
        "model": model,
        "params": _sampling_params(body, chat=chat, defaults=defaults),
        "stream": bool(body.get("stream")),
        "include_usage": bool((options or {}).get("include_usage")),
        "cache_salt": body.get("cache_salt"),
        "user": body.get("user"),
    }


def parse_chat_request(body, defaults: dict | None = None) -> ParsedRequest:
    common = _common(body, chat=True, defaults=defaults or {})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a 'role'", "messages")
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text is supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"messages[{i}].content: only text parts are supported", "messages")
                texts.append(part["text"])
            messages[i] = {**message, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")
    return ParsedRequest(messages=messages, **common)


def parse_completion_request(body, defaults: dict | None = None) -> ParsedRequest:
    common = _common(body, chat=False, defaults=defaults or {})
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise invalid("'prompt' must be a string, a list of token ids, or a list holding one of those "
                          "(batches of several prompts are not supported)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise invalid("'prompt' must be a non-empty string or a list of token ids", "prompt")
    _check_type(body, "echo", (bool,), "a boolean")
    if body.get("suffix"):
        raise invalid("'suffix' is not supported", "suffix")
    if body.get("best_of") not in (None, 1):
        raise invalid("'best_of' is not supported", "best_of")
    return ParsedRequest(prompt=prompt, echo=bool(body.get("echo")), **common)
