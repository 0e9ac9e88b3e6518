"""Structured outputs and tool calls through the gateway (uvicorn, maas.asgi) in front of the real engine on
SmolLM2, with the openai SDK: `parse` with a Pydantic model, a streamed tool call, metering that counts the
tool prompt, and a quota hold that counts tool definitions."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from inference import validation
from inference.models import UsageRecord
from tests.openapi_spec import validate_response, validate_stream

from .conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ASK = [{"role": "user", "content": "What is the weather in Oslo? Use the tool."}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "minLength": 1, "maxLength": 20}},
                                                "required": ["city"], "additionalProperties": False}}}


class Pet(BaseModel):
    name: str = Field(max_length=16)
    species: Literal["cat", "dog", "rabbit"]
    age: int


@pytest.fixture
def smollm2(engine_server):
    return add_model("smollm2", engine_server, context_length=2048)


def client_for(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0, timeout=300)


def test_parse_with_a_pydantic_model_returns_the_parsed_object(gateway, smollm2):
    tenant = make_tenant()
    raw = client_for(gateway, tenant.raw_key).chat.completions.with_raw_response.parse(
        model="smollm2", messages=[{"role": "user", "content": "Invent a pet and describe it as JSON."}],
        response_format=Pet, max_tokens=80, temperature=0)
    validate_response("/v1/chat/completions", "post", 200, raw.http_response.json())
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Pet)
    assert Pet.model_validate_json(choice.message.content) == choice.message.parsed
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert record.status == "ok" and record.completion_tokens == completion.usage.completion_tokens


def test_a_streamed_tool_call_through_the_gateway_is_reassembled_and_billed_with_its_tool_prompt(gateway, smollm2,
                                                                                                   engine_server):
    tenant = make_tenant()
    fields = {"model": "smollm2", "messages": ASK, "tools": [WEATHER], "tool_choice": "required",
              "parallel_tool_calls": False, "max_tokens": 40, "temperature": 0}
    with client_for(gateway, tenant.raw_key).chat.completions.stream(
            **fields, stream_options={"include_usage": True}) as stream:
        final = stream.get_final_completion()
    call = final.choices[0].message.tool_calls[0]
    assert final.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    tool_prompt = httpx.post(f"{engine_server}/tokenize", json={"messages": ASK, "tools": [WEATHER]}).json()["count"]
    plain_prompt = httpx.post(f"{engine_server}/tokenize", json={"messages": ASK}).json()["count"]
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert record.prompt_tokens == final.usage.prompt_tokens == tool_prompt > plain_prompt + 50
    raw = httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {tenant.raw_key}"},
                     json={**fields, "stream": True}, timeout=300)
    chunks = validate_stream("/v1/chat/completions", "post", raw.text)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_quota_hold_counts_tool_definitions_and_tool_calls_in_the_history():
    plain = validation.parse_chat({"model": "m", "messages": ASK, "max_tokens": 1})
    tools = validation.parse_chat({"model": "m", "messages": ASK, "max_tokens": 1, "tools": [WEATHER] * 1})
    arguments = json.dumps({"city": "x" * 500})
    history = validation.parse_chat({"model": "m", "max_tokens": 1, "messages": [
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"}]})
    assert tools.prompt_bound - plain.prompt_bound > len(json.dumps(WEATHER))
    assert history.prompt_bound - plain.prompt_bound > len(arguments) + len("cold")


def test_vllm_guided_fields_and_prompt_logprobs_through_the_gateway(gateway, smollm2):
    """The SDK's `extra_body` carries vLLM's fields; the gateway validates them with the engine's schema,
    passes them on, and bills the answer like any other."""
    tenant = make_tenant()
    client = client_for(gateway, tenant.raw_key)
    chosen = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Is the sky blue?"}], max_tokens=8,
        temperature=1.0, seed=5, extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert chosen.choices[0].message.content in ("yes", "no", "maybe")
    assert chosen.choices[0].finish_reason == "stop"
    raw = client.completions.with_raw_response.create(
        model="smollm2", prompt="The capital of France is", max_tokens=3, temperature=0, echo=True, logprobs=1,
        extra_body={"prompt_logprobs": 1})
    body = raw.http_response.json()
    validate_response("/v1/completions", "post", 200, body)
    choice = body["choices"][0]
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert len(choice["prompt_logprobs"]) == prompt_tokens and choice["prompt_logprobs"][0] is None
    assert len(choice["logprobs"]["tokens"]) == prompt_tokens - 1 + body["usage"]["completion_tokens"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4,
                                       extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert refused.value.body["param"] == "guided_choice"
    records = UsageRecord.objects.filter(organization=tenant.organization).order_by("id")
    assert [r.prompt_tokens for r in records][1] == prompt_tokens
    assert [r.completion_tokens for r in records] == [chosen.usage.completion_tokens, 3]
