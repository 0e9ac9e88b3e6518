"""Structured outputs and tool calls through `python -m engine serve` on SmolLM2 (a weak model: only the
constrained decoding makes its output valid), driven by the openai SDK; every body and chunk is checked
against OpenAI's OpenAPI spec."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from engine.loader import demo_model_path
from tests.engine.structured_schemas import SCHEMAS
from tests.openapi_spec import validate_error, validate_response, validate_stream
from tests.processes import start_engine, stop

MODEL = "smollm2-structured"
pytestmark = pytest.mark.slow
CHAT = "/v1/chat/completions"
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": WEATHER_ARGS}},
    {"type": "function", "function": {"name": "get_time", "description": "Local time in a time zone",
                                      "parameters": {"type": "object", "properties": {"zone": {
                                          "enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
                                          "additionalProperties": False}}},
]
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def server():
    process, url = start_engine(demo_model_path(), "--served-model-name", MODEL, "--kv-cache-memory", "256MiB",
                                "--max-model-len", "2048", "--threads", "2", "--log-level", "warning")
    yield url
    stop(process, timeout=20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def post(server: str, body: dict, path: str = CHAT) -> httpx.Response:
    return httpx.post(f"{server}{path}", json={"model": MODEL, **body}, timeout=300)


def test_json_schema_answers_that_stop_validate_for_every_schema_with_sampled_decoding(server):
    """The suite's schemas (>= 20), two sampled answers each, sent at once so they share batches."""
    def ask(case):
        (what, schema), seed = case
        body = {"messages": [{"role": "user", "content": f"Give me {what} as JSON."}], "max_tokens": 96,
                "temperature": 1.0, "seed": seed,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema,
                                                                             "strict": True}}}
        return schema, post(server, body)

    cases = [(s, seed) for s in SCHEMAS for seed in (1, 2)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(ask, cases))
    stopped = 0
    for schema, response in results:
        assert response.status_code == 200, response.text
        validate_response(CHAT, "post", 200, response.json())
        choice = response.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length")
        if choice["finish_reason"] == "stop":
            stopped += 1
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    print(f"\n{stopped}/{len(results)} answers stopped; all of them validate")
    assert len(SCHEMAS) >= 20 and stopped >= 0.75 * len(results)


def test_json_object_on_completions_streamed_and_not(server):
    body = {"prompt": "A JSON object describing a cat:", "max_tokens": 64, "temperature": 0,
            "response_format": {"type": "json_object"}}
    whole = post(server, body, "/v1/completions")
    assert whole.status_code == 200, whole.text
    validate_response("/v1/completions", "post", 200, whole.json())
    choice = whole.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["text"]), dict)
    streamed = post(server, {**body, "stream": True}, "/v1/completions")
    chunks = validate_stream("/v1/completions", "post", streamed.text)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == choice["text"]


@pytest.mark.parametrize(("fields", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"tools": [*TOOLS, {"type": "function", "function": {"name": "bad", "parameters": {"type": "frobnicate"}}}],
      "tool_choice": "required"}, "tools[2].function.parameters"),
    ({"response_format": {"type": "grammar"}}, "response_format.type"),
])
def test_a_schema_the_library_cannot_compile_is_a_400_naming_its_field(server, fields, param):
    response = post(server, {"messages": ASK, "max_tokens": 4, **fields})
    assert response.status_code == 400, response.text
    validate_error(response.json())
    assert response.json()["error"]["param"] == param
    assert post(server, {"messages": ASK, "max_tokens": 2}).status_code == 200  # and the engine goes on


def test_required_and_named_tool_choice_always_give_arguments_that_validate(server):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    choices = ["required", {"type": "function", "function": {"name": "get_time"}},
               {"type": "function", "function": {"name": "get_weather"}}]
    for choice in choices:
        body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": False,
                "max_tokens": 60, "temperature": 1.0, "n": 3, "seed": 7}
        response = post(server, body)
        assert response.status_code == 200, response.text
        validate_response(CHAT, "post", 200, response.json())
        for c in response.json()["choices"]:
            assert c["finish_reason"] == "tool_calls", c
            calls = c["message"]["tool_calls"]
            assert len(calls) == 1 and calls[0]["id"].startswith("call_") and c["message"]["content"] is None
            name = calls[0]["function"]["name"]
            if isinstance(choice, dict):
                assert name == choice["function"]["name"]
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schemas[name])


def test_a_streamed_tool_call_is_reassembled_by_the_sdk(server, client):
    fields = {"model": MODEL, "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    with client.chat.completions.stream(**fields) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_ARGS)
    whole = client.chat.completions.create(**fields)
    assert whole.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    raw = post(server, {**{k: v for k, v in fields.items() if k != "model"}, "stream": True})
    chunks = validate_stream(CHAT, "post", raw.text)
    parts = [tc for c in chunks for tc in (c["choices"][0]["delta"].get("tool_calls") or [])]
    assert parts[0]["id"].startswith("call_") and parts[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(p["function"].get("arguments", "") for p in parts) == call.function.arguments


def test_a_two_turn_tool_conversation_call_result_answer(server, client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=60, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_celsius": 21})}]
    answer_schema = {"type": "object", "properties": {"temperature_celsius": {"type": "integer"}},
                     "required": ["temperature_celsius"], "additionalProperties": False}
    second = post(server, {"messages": history, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
                           "response_format": {"type": "json_schema", "json_schema": {
                               "name": "answer", "schema": answer_schema, "strict": True}}})
    assert second.status_code == 200, second.text
    validate_response(CHAT, "post", 200, second.json())
    choice = second.json()["choices"][0]
    # tool_choice auto with a response format: either another call or the answer, both constrained
    assert choice["finish_reason"] in ("stop", "tool_calls"), choice
    if choice["finish_reason"] == "stop":
        jsonschema.validate(json.loads(choice["message"]["content"]), answer_schema)
    # the tool result and the call are in the prompt the model saw
    without = httpx.post(f"{server}/tokenize", json={"messages": ASK, "tools": TOOLS}).json()["count"]
    with_result = httpx.post(f"{server}/tokenize", json={"messages": history, "tools": TOOLS}).json()["count"]
    assert second.json()["usage"]["prompt_tokens"] == with_result > without + 20
