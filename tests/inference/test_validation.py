"""Request validation: OpenAI's 400 body with `param`, unknown fields kept for the engine."""

from __future__ import annotations

import pytest

from inference.errors import GatewayError, error_body
from inference.validation import parse_chat, parse_completion

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "param"), [
    ([], None),
    ({"messages": MESSAGES}, "model"),
    ({"model": 3, "messages": MESSAGES}, "model"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0].type"),
    ({"model": "m", "messages": MESSAGES, "top_p": 1.5}, "top_p"),
    ({"model": "m", "messages": MESSAGES, "temperature": True}, "temperature"),
    ({"model": "m", "messages": MESSAGES, "max_tokens": 1.5}, "max_tokens"),
    ({"model": "m", "messages": MESSAGES, "max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"model": "m", "messages": MESSAGES, "n": 0}, "n"),
    ({"model": "m", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": MESSAGES, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"model": "m", "messages": MESSAGES, "stream": "yes"}, "stream"),
    ({"model": "m", "messages": MESSAGES, "stream": True, "stream_options": []}, "stream_options"),
    ({"model": "m", "messages": MESSAGES, "top_logprobs": 21}, "top_logprobs"),
    # Bounds on per-request work in the step loop.
    ({"model": "m", "messages": MESSAGES, "stop": "x" * 1025}, "stop"),
    ({"model": "m", "messages": MESSAGES, "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"model": "m", "messages": MESSAGES, "stop_token_ids": list(range(1025))}, "stop_token_ids"),
    ({"model": "m", "messages": MESSAGES, "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    # vLLM's min_tokens (at most the completion's bound) and include_stop_str_in_output.
    ({"model": "m", "messages": MESSAGES, "min_tokens": -1}, "min_tokens"),
    ({"model": "m", "messages": MESSAGES, "min_tokens": 1.0}, "min_tokens"),
    ({"model": "m", "messages": MESSAGES, "min_tokens": 6, "max_tokens": 5}, "min_tokens"),
    ({"model": "m", "messages": MESSAGES, "min_tokens": 6, "max_completion_tokens": 5}, "min_tokens"),
    ({"model": "m", "messages": MESSAGES, "include_stop_str_in_output": "yes"}, "include_stop_str_in_output"),
])
def test_chat_errors_name_the_parameter(body, param):
    with pytest.raises(GatewayError) as err:
        parse_chat(body)
    assert err.value.status == 400 and err.value.param == param and err.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": ["a", "b"], "n": 65}, "prompt"),  # 130 choices
    ({"model": "m", "prompt": "x", "logprobs": 6}, "logprobs"),
    ({"model": "m", "prompt": "x", "echo": 1}, "echo"),
    ({"model": "m", "prompt": "x", "min_tokens": 17}, "min_tokens"),  # over the default max_tokens 16
])
def test_completion_errors_name_the_parameter(body, param):
    with pytest.raises(GatewayError) as err:
        parse_completion(body)
    assert err.value.param == param


def test_valid_requests_keep_unknown_fields_and_flags():
    request = parse_chat({"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True},
                          "top_k": 5, "repetition_penalty": 1.1})
    assert request.stream and request.include_usage
    assert request.body["top_k"] == 5 and request.body["repetition_penalty"] == 1.1
    plain = parse_chat({"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": []}, *MESSAGES]})
    assert not plain.stream and not plain.include_usage and plain.max_completion_tokens is None


def test_error_body_shape():
    assert error_body("m", "t") == {"error": {"message": "m", "type": "t", "param": None, "code": None}}


def test_a_batch_of_prompts_holds_quota_for_every_prompt_and_choice():
    prompts = ["héllo", "two", "three!"]
    request = parse_completion({"model": "m", "prompt": prompts, "n": 2, "max_tokens": 10})
    assert request.n == 6  # one engine request per prompt, n choices each
    assert request.prompt_bound == sum(len(p.encode()) + 1 for p in prompts)  # + a special token each
    assert request.reservation(100, None, overhead=0, default_max_tokens=0) == request.prompt_bound + 6 * 10
    ids = parse_completion({"model": "m", "prompt": [[1, 2, 3], [4]], "max_tokens": 5})
    assert ids.n == 2 and ids.prompt_bound == 4  # token ids are the tokens: nothing is added to them
    single = parse_completion({"model": "m", "prompt": "abc", "n": 3, "max_tokens": 5})
    assert single.n == 3 and single.prompt_bound == 4


def test_an_embeddings_hold_bounds_every_input_and_nothing_generated():
    from inference.validation import parse_embedding

    request = parse_embedding({"model": "m", "input": ["héllo", "hi"]})
    # bytes + [CLS] and [SEP] per string: 6 + 2 and 2 + 2; no template overhead, no completion
    assert (request.endpoint, request.n, request.prompt_bound) == ("embeddings", 2, 12)
    assert request.reservation(256, None, overhead=256, default_max_tokens=4096) == 12
    tokens = parse_embedding({"model": "m", "input": [[101, 7592, 102]] * 3})
    assert tokens.reservation(256, None, overhead=256, default_max_tokens=4096) == 9
    assert parse_embedding({"model": "m", "input": "x" * 1000}).reservation(256, None, 256, 4096) == 256  # <= context
    with pytest.raises(GatewayError) as exc:
        parse_embedding({"model": "m", "input": "x", "extra": 1})
    assert (exc.value.status, exc.value.param) == (400, "extra")
