"""Through `python -m engine serve` (a tiny checkpoint, fp32): echo with logprobs and vLLM's
`prompt_logprobs` give the prompt tokens' logprobs as transformers computes them; vLLM's `guided_*` and
`structured_outputs` fields constrain the answer like `response_format` does. Bodies and chunks are
checked against OpenAI's OpenAPI spec."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
import torch

from engine.loader import load_model
from tests.engine.checkpoints import load_reference, tiny_checkpoint
from tests.openapi_spec import validate_error, validate_response, validate_stream
from tests.processes import start_engine, stop

MODEL = "tiny-surface"
PROMPT = "Paged attention reads keys and values through block tables."


@pytest.fixture(scope="module")
def path():
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def server(path):
    process, url = start_engine(path, "--served-model-name", MODEL, "--kv-cache-memory", "64MiB",
                                "--dtype", "float32", "--threads", "2", "--log-level", "warning")
    yield url
    stop(process, timeout=20)


@pytest.fixture(scope="module")
def reference_logprobs(path):
    """transformers' log-softmax at each position of `ids`."""
    reference = load_reference(path)

    def logprobs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return reference(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return logprobs


@pytest.fixture(scope="module")
def tokenizer(path):
    return load_model(path).tokenizer


def post(server: str, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server}{endpoint}", json={"model": MODEL, **body}, timeout=120)


def test_echo_with_logprobs_covers_the_prompt(server, tokenizer, reference_logprobs):
    ids = tokenizer.encode(PROMPT)
    body = {"prompt": PROMPT, "echo": True, "logprobs": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    response = post(server, "/v1/completions", body)
    assert response.status_code == 200, response.text
    validate_response("/v1/completions", "post", 200, response.json())
    choice = response.json()["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(PROMPT)
    prompt_part = len(ids) - 1  # from the second prompt token: the first has no logprob
    assert len(logprobs["tokens"]) == prompt_part + 4
    assert logprobs["tokens"][:prompt_part] == [tokenizer.decode([t], skip_special_tokens=False) for t in ids[1:]]
    ref = reference_logprobs(ids)
    for i, token in enumerate(ids[1:]):
        assert logprobs["token_logprobs"][i] == pytest.approx(float(ref[i, token]), abs=1e-4)
        top = logprobs["top_logprobs"][i]  # keyed by text: two byte tokens may both read "\ufffd"
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(float(ref[i].max()), abs=1e-4)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and offsets[prompt_part] == len(PROMPT)

    streamed = post(server, "/v1/completions", {**body, "stream": True})
    chunks = validate_stream("/v1/completions", "post", streamed.text)
    assert chunks[0]["choices"][0]["text"] == PROMPT
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
        logprobs["token_logprobs"][:prompt_part], abs=1e-5)
    generated = [c["choices"][0] for c in chunks[1:] if c["choices"]]
    assert "".join(c["text"] for c in generated) == choice["text"][len(PROMPT):]


def test_echo_without_logprobs_is_unchanged(server):
    body = {"prompt": PROMPT, "echo": True, "max_tokens": 2, "temperature": 0}
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    assert choice["text"].startswith(PROMPT) and choice["logprobs"] is None


def test_prompt_logprobs_on_chat_and_completions(server, tokenizer, reference_logprobs):
    chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": PROMPT}],
                                                 "max_tokens": 2, "prompt_logprobs": 1})
    assert chat.status_code == 200, chat.text
    validate_response("/v1/chat/completions", "post", 200, chat.json())
    entries = chat.json()["prompt_logprobs"]
    assert len(entries) == chat.json()["usage"]["prompt_tokens"] and entries[0] is None
    assert all(1 <= len(e) <= 2 and all(v["rank"] >= 1 for v in e.values()) for e in entries[1:])

    ids = tokenizer.encode(PROMPT)
    completion = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "n": 2, "temperature": 1,
                                                  "seed": 3, "prompt_logprobs": 0})
    assert completion.status_code == 200, completion.text
    validate_response("/v1/completions", "post", 200, completion.json())
    ref = reference_logprobs(ids)
    for choice in completion.json()["choices"]:
        entries = choice["prompt_logprobs"]
        assert entries[0] is None and len(entries) == len(ids)
        for i, (token, entry) in enumerate(zip(ids[1:], entries[1:], strict=True)):
            assert list(entry) == [str(token)]  # prompt_logprobs 0: the prompt token alone
            assert entry[str(token)]["logprob"] == pytest.approx(float(ref[i, token]), abs=1e-4)
            assert entry[str(token)]["rank"] == int((ref[i] > ref[i, token]).sum()) + 1


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_prompt_logprobs_refused_when_streaming(server, endpoint):
    body = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in endpoint else {"prompt": "hi"}
    response = post(server, endpoint, {**body, "stream": True, "prompt_logprobs": 1})
    assert response.status_code == 400
    validate_error(response.json())
    assert response.json()["error"]["param"] == "prompt_logprobs"


REGEX = r"(yes|no), [0-9]{1,3}/[a-c]{2}"
NAME_AGE = {"type": "object", "properties": {"name": {"enum": ["Ann", "Bob"]},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["name", "age"], "additionalProperties": False}
GRAMMAR = 'start: greeting " " name\ngreeting: "hello" | "hi"\nname: /[A-Z][a-z]{1,5}/\n'


@pytest.mark.parametrize(("fields", "check"), [
    ({"guided_regex": REGEX}, lambda text: re.fullmatch(REGEX, text)),
    ({"structured_outputs": {"regex": REGEX}}, lambda text: re.fullmatch(REGEX, text)),
    ({"guided_choice": ["red", "green", "blue"]}, lambda text: text in ("red", "green", "blue")),
    ({"guided_json": NAME_AGE}, lambda text: jsonschema.validate(json.loads(text), NAME_AGE) is None),
    ({"guided_json": json.dumps(NAME_AGE)}, lambda text: jsonschema.validate(json.loads(text), NAME_AGE) is None),
    ({"structured_outputs": {"json_object": True}}, lambda text: isinstance(json.loads(text), dict)),
    ({"guided_grammar": GRAMMAR}, lambda text: re.fullmatch(r"(hello|hi) [A-Z][a-z]{1,5}", text)),
])
def test_guided_fields_constrain_sampled_answers(server, fields, check):
    stopped = 0
    for seed in range(4):
        for endpoint, body in (("/v1/completions", {"prompt": "Answer:"}),
                               ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Answer."}]})):
            response = post(server, endpoint, {**body, **fields, "max_tokens": 48, "temperature": 1.0, "seed": seed})
            assert response.status_code == 200, response.text
            validate_response(endpoint, "post", 200, response.json())
            choice = response.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            if choice["finish_reason"] == "stop":
                stopped += 1
                assert check(text), text
    assert stopped >= 4  # most answers complete within max_tokens


@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"guided_regex": "a(", "max_tokens": 2}, "guided_regex", None),
    ({"guided_json": "{not json"}, "guided_json", "invalid_value"),
    ({"guided_json": "[1, 2]"}, "guided_json", "invalid_value"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar", None),
    ({"guided_choice": []}, "guided_choice", None),
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "invalid_value"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format", "invalid_value"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice", "invalid_value"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern",
     "unknown_parameter"),
    ({"guided_regex": "a", "tools": [{"type": "function", "function": {"name": "f"}}]}, "guided_regex",
     "invalid_value"),
])
def test_bad_guided_fields_are_400s_naming_them(server, fields, param, code):
    response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], **fields})
    assert response.status_code == 400, response.text
    validate_error(response.json())
    error = response.json()["error"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert post(server, "/v1/completions", {"prompt": "x", "max_tokens": 1}).status_code == 200
