"""The ASGI app in-process on a tiny checkpoint: bearer API key, 503 when overloaded, request validation."""

import pytest
import torch
from starlette.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.protocol import APIError, parse_chat_request, parse_completion_request
from engine.server import build_app
from tests.engine.checkpoints import tiny_checkpoint
from tests.openapi_spec import validate_response, validate_stream

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def keyed():
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint("llama")), served_model_name="tiny", block_size=4, num_kv_blocks=64
        )
    )
    with TestClient(build_app(AsyncEngine(engine), api_key="s3cret")) as client:
        yield client


def test_api_key_required_on_api_routes(keyed):
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 2}
    resp = keyed.post("/v1/completions", json=body)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    assert (
        keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    )
    ok = keyed.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.post("/tokenize", json={"prompt": "x"}).status_code == 401
    assert keyed.get("/health").status_code == 200  # probes need no key
    assert keyed.get("/metrics").status_code == 200


def test_overloaded_engine_answers_503():
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_checkpoint("llama")),
            served_model_name="tiny",
            block_size=4,
            num_kv_blocks=64,
            max_waiting_requests=0,
        )
    )
    with TestClient(build_app(AsyncEngine(engine))) as client:
        resp = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "engine_overloaded"


def test_n_choices_over_http(keyed):
    resp = keyed.post(
        "/v1/chat/completions",
        headers={"Authorization": "Bearer s3cret"},
        json={
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "n": 3,
            "max_tokens": 4,
            "seed": 3,
            "temperature": 1.0,
            "ignore_eos": True,
        },
    )
    body = resp.json()
    assert resp.status_code == 200 and [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 12  # 3 choices x 4 tokens


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        (
            {
                "model": "m",
                "messages": [{"role": "user", "content": "x"}],
                "stream_options": {"include_usage": True},
            },
            "stream_options",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
            "max_completion_tokens",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 3}, "stop"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "cache_salt": ""}, "cache_salt"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ],
)
def test_chat_request_validation_names_the_field(body, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert info.value.param == param and info.value.status == 400


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "prompt": ""}, "prompt"),
        ({"model": "m", "prompt": ["a", ""]}, "prompt[1]"),
        ({"model": "m", "prompt": "x", "logprobs": 9}, "logprobs"),
        ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ],
)
def test_completion_request_validation_names_the_field(body, param):
    with pytest.raises(APIError) as info:
        parse_completion_request(body)
    assert info.value.param == param


def test_completion_request_accepts_token_ids_and_one_element_batches():
    assert parse_completion_request({"model": "m", "prompt": [1, 2, 3]}).prompt == [1, 2, 3]
    assert parse_completion_request({"model": "m", "prompt": "x"}).params.max_tokens == 16  # OpenAI's default
    assert parse_completion_request({"model": "m", "prompt": ["hello"]}).prompt == "hello"
    parsed = parse_completion_request(
        {
            "model": "m",
            "prompt": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
            "cache_salt": "org-1",
        }
    )
    assert parsed.include_usage and parsed.cache_salt == "org-1"


def test_min_tokens_and_include_stop_str_in_output_over_http(keyed):
    auth = {"Authorization": "Bearer s3cret"}
    eos = next(iter(keyed.app.state.server.llm.eos_token_ids))
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 8, "temperature": 0, "logit_bias": {str(eos): 100}}
    assert keyed.post("/v1/completions", headers=auth, json=body).json()["usage"]["completion_tokens"] == 1
    held = keyed.post("/v1/completions", headers=auth, json={**body, "min_tokens": 3}).json()
    assert held["usage"]["completion_tokens"] == 4 and held["choices"][0]["finish_reason"] == "stop"
    free = keyed.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "The quick", "max_tokens": 10,
                                                             "temperature": 0, "ignore_eos": True}).json()
    text = free["choices"][0]["text"]
    stop = text[3:6]
    kept = keyed.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "The quick", "max_tokens": 10,
                                                             "temperature": 0, "ignore_eos": True, "stop": stop,
                                                             "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == text[:text.index(stop) + len(stop)]
    too_many = keyed.post("/v1/completions", headers=auth, json={**body, "min_tokens": 9})
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "min_tokens"


def test_several_prompts_are_one_request_each_with_choices_prompt_major(keyed):
    auth = {"Authorization": "Bearer s3cret"}
    common = {"model": "tiny", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    prompts = ["Hello", "Once upon a", "The quick"]
    alone = [keyed.post("/v1/completions", headers=auth, json={**common, "prompt": p}).json() for p in prompts]
    resp = keyed.post("/v1/completions", headers=auth, json={**common, "prompt": prompts, "n": 2})
    assert resp.status_code == 200
    body = resp.json()
    validate_response("/v1/completions", "post", 200, body)
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for k, choice in enumerate(body["choices"]):  # index = prompt_i * n + choice_j; greedy: the lone answer
        assert choice["text"] == alone[k // 2]["choices"][0]["text"] and choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert body["usage"]["completion_tokens"] == 6 * 3
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 18
    ids = keyed.post("/v1/completions", headers=auth, json={**common, "prompt": [[5, 6, 7], [8, 9]]}).json()
    validate_response("/v1/completions", "post", 200, ids)
    assert [c["index"] for c in ids["choices"]] == [0, 1] and ids["usage"]["prompt_tokens"] == 5


def test_several_prompts_stream_prompt_major_with_summed_usage(keyed):
    auth = {"Authorization": "Bearer s3cret"}
    common = {"model": "tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "n": 2}
    prompts = ["Hello", "The quick"]
    whole = keyed.post("/v1/completions", headers=auth, json={**common, "prompt": prompts, "echo": True}).json()
    resp = keyed.post("/v1/completions", headers=auth, json={**common, "prompt": prompts, "echo": True, "stream": True,
                                                             "stream_options": {"include_usage": True}})
    chunks = validate_stream("/v1/completions", "post", resp.text)
    texts, finish = {}, {}
    for chunk in chunks[:-1]:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
            finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
    assert texts == {c["index"]: c["text"] for c in whole["choices"]}
    assert all(texts[k].startswith(prompts[k // 2]) for k in range(4))  # echo: each choice its own prompt
    assert finish == dict.fromkeys(range(4), "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["completion_tokens"] == 16


@pytest.mark.parametrize(("prompt", "extra", "param"), [
    ([], {}, "prompt"),
    (["Hello", ""], {}, "prompt[1]"),
    ([[1, 2], []], {}, "prompt[1]"),
    (["a"] * 65, {"n": 2}, "prompt"),  # 130 choices: over 128
    (["Hello", [1, 10**6]], {}, "prompt"),  # a token id past the vocabulary, in the second prompt
])
def test_a_bad_prompt_in_a_batch_refuses_the_whole_request(keyed, prompt, extra, param):
    resp = keyed.post("/v1/completions", headers={"Authorization": "Bearer s3cret"},
                      json={"model": "tiny", "prompt": prompt, "max_tokens": 2, **extra})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    validate_response("/v1/completions", "post", 400, resp.json())
    assert keyed.app.state.server.llm.requests == {}  # none of the batch was submitted


def test_several_prompts_are_submitted_in_one_command(monkeypatch):
    """generate_many queues one command, so the engine loop admits every prompt of a batch in one step.
    The engine loop is not started (so the command stays queued to be looked at); `healthy` is patched
    to say it runs."""
    import asyncio

    engine = LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), served_model_name="tiny", block_size=4,
                                    num_kv_blocks=64))
    async_engine = AsyncEngine(engine)
    monkeypatch.setattr(AsyncEngine, "healthy", property(lambda self: True))
    from engine.sampling_params import SamplingParams

    async def submit():
        return async_engine.generate_many([("a", [5, 6]), ("b", [7, 8, 9])], SamplingParams(max_tokens=2))

    streams = asyncio.run(submit())
    assert len(streams) == 2 and len(async_engine._commands) == 1
    async_engine._apply_commands()
    assert set(engine.requests) == {"a", "b"}


def test_models_carry_context_length_capabilities_and_tool_format(keyed):
    auth = {"Authorization": "Bearer s3cret"}
    listed = keyed.get("/v1/models", headers=auth).json()
    validate_response("/v1/models", "get", 200, listed)
    model = listed["data"][0]
    assert model["max_model_len"] == keyed.app.state.server.llm.scheduler.max_model_len
    assert model["capabilities"] == {"tools": True, "json_schema": True, "json_object": True}
    assert model["tool_format"] == "auto"
    one = keyed.get("/v1/models/tiny", headers=auth).json()
    validate_response("/v1/models/tiny", "get", 200, one)
    assert one == model


TOOLS_TEMPLATE = ("{% if tools %}<tools>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}</tools>{% endif %}"
                  "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>")
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def test_tool_format_picks_the_template_or_the_hermes_default(keyed, monkeypatch):
    """A template that renders tools gets them with tool_format auto; hermes always writes the default format."""
    server = keyed.app.state.server
    monkeypatch.setattr(server.tokenizer, "chat_template", TOOLS_TEMPLATE)
    auth = {"Authorization": "Bearer s3cret"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Weather?"}], "tools": [WEATHER]}

    def rendered(**extra) -> str:
        resp = keyed.post("/tokenize", headers=auth, json={**body, **extra})
        assert resp.status_code == 200, resp.text
        return server.tokenizer.decode(resp.json()["tokens"], skip_special_tokens=False)

    assert "<tools>get_weather;</tools>" in rendered() and "<tool_call>" not in rendered()
    assert rendered(tool_format="auto") == rendered()
    hermes = rendered(tool_format="hermes")
    assert "<tools>get_weather;" not in hermes and "<tool_call>" in hermes and "get_weather" in hermes
    monkeypatch.setattr(server.prompts, "tool_format", "hermes")  # the server's --tool-format default
    assert rendered() == hermes and "<tools>get_weather;" in rendered(tool_format="auto")
    refused = keyed.post("/v1/chat/completions", headers=auth, json={**body, "tool_format": "xml", "max_tokens": 1})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_format"
    legacy = keyed.post("/v1/completions", headers=auth, json={"model": "tiny", "prompt": "x", "tool_format": "auto"})
    assert legacy.status_code == 400 and legacy.json()["error"]["code"] == "unknown_parameter"
