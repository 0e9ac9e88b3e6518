"""/v1/responses (non-streaming) end to end: the openai SDK → the gateway → `python -m engine serve` on
SmolLM2, with PostgreSQL: create, retrieve, delete, input items, `previous_response_id`, `store`,
retention, billing, organization scoping, and function tools (a call, its output, the answer)."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import openai
import pytest
from django.utils import timezone

from accounts.models import Entitlement
from inference.models import StoredResponse, UsageRecord, UsageStatus
from inference.responses import purge_expired
from tests.openapi_spec import validate_error, validate_response

from .conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture
def smollm2(engine_server):
    return add_model("smollm2", engine_server, context_length=2048, price_input_per_million=1,
                     price_output_per_million=4)


def client_for(gateway, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=120)


def call(gateway, tenant, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(method, f"{gateway}/v1/{path}", json=body, timeout=120,
                         headers={"authorization": f"Bearer {tenant.raw_key}"})


def test_create_then_retrieve_bills_once_and_is_on_the_spec(gateway, smollm2):
    tenant = make_tenant("resp-create")
    client = client_for(gateway, tenant)
    created = client.responses.create(model="smollm2", input="What is the capital of France?",
                                      max_output_tokens=8, temperature=0)
    assert created.id.startswith("resp_") and created.object == "response" and created.model == "smollm2"
    assert created.status in ("completed", "incomplete") and created.output_text
    assert created.usage.output_tokens <= 8 and created.usage.input_tokens > 5
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    assert created.usage.input_tokens_details.cached_tokens >= 0
    validate_response("/v1/responses", "post", 200, created.model_dump(exclude_unset=True))

    again = client.responses.retrieve(created.id)
    assert again.model_dump() == created.model_dump()
    validate_response("/v1/responses/{response_id}", "get", 200, again.model_dump(exclude_unset=True))
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert (record.endpoint, record.status) == ("responses", UsageStatus.OK)
    assert (record.prompt_tokens, record.completion_tokens) == (created.usage.input_tokens, created.usage.output_tokens)
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (created.usage.total_tokens, 0)

    items = call(gateway, tenant, "GET", f"responses/{created.id}/input_items").json()
    assert [(i["role"], i["content"]) for i in items["data"]] == [
        ("user", [{"type": "input_text", "text": "What is the capital of France?"}])]


def test_previous_response_id_continues_the_stored_conversation(gateway, smollm2):
    tenant = make_tenant("resp-turns")
    client = client_for(gateway, tenant)
    first = client.responses.create(model="smollm2", input="My name is Ada.", max_output_tokens=6, temperature=0,
                                    instructions="You are terse.")
    alone = client.responses.create(model="smollm2", input="What is my name?", max_output_tokens=6, temperature=0,
                                    store=False)
    second = client.responses.create(model="smollm2", input="What is my name?", max_output_tokens=6, temperature=0,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    # the second prompt holds the first turn (its input and answer): more than the question alone by at
    # least the first answer's tokens
    assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens
    history = StoredResponse.objects.get(response_id=second.id).history
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "My name is Ada." and history[1]["content"] == first.output_text
    assert all(m["role"] != "system" for m in history)  # instructions are not carried over


def test_store_false_and_delete_leave_nothing_to_retrieve(gateway, smollm2):
    tenant = make_tenant("resp-store")
    client = client_for(gateway, tenant)
    unstored = client.responses.create(model="smollm2", input="Hi", max_output_tokens=2, store=False)
    assert unstored.store is False
    assert call(gateway, tenant, "GET", f"responses/{unstored.id}").status_code == 404
    kept = client.responses.create(model="smollm2", input="Hi", max_output_tokens=2)
    deleted = call(gateway, tenant, "DELETE", f"responses/{kept.id}")
    assert deleted.json() == {"id": kept.id, "object": "response.deleted", "deleted": True}
    for method in ("GET", "DELETE"):
        gone = call(gateway, tenant, method, f"responses/{kept.id}")
        assert gone.status_code == 404 and gone.json()["error"]["param"] == "response_id"
        validate_error(gone.json())
    assert UsageRecord.objects.filter(organization=tenant.organization, endpoint="responses").count() == 2


def test_another_organizations_response_is_a_404_everywhere(gateway, smollm2):
    owner, other = make_tenant("resp-owner"), make_tenant("resp-other")
    kept = client_for(gateway, owner).responses.create(model="smollm2", input="Hi", max_output_tokens=2)
    for method, path in (("GET", f"responses/{kept.id}"), ("DELETE", f"responses/{kept.id}"),
                         ("GET", f"responses/{kept.id}/input_items")):
        response = call(gateway, other, method, path)
        assert response.status_code == 404, (method, path, response.text)
    continued = call(gateway, other, "POST", "responses",
                     {"model": "smollm2", "input": "Hi", "max_output_tokens": 2, "previous_response_id": kept.id})
    assert continued.status_code == 404
    assert not UsageRecord.objects.filter(organization=other.organization).exists()
    assert call(gateway, owner, "GET", f"responses/{kept.id}").status_code == 200  # still there


def test_an_expired_response_is_a_404_and_is_purged(gateway, smollm2):
    tenant = make_tenant("resp-expiry")
    kept = client_for(gateway, tenant).responses.create(model="smollm2", input="Hi", max_output_tokens=2)
    StoredResponse.objects.filter(response_id=kept.id).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert call(gateway, tenant, "GET", f"responses/{kept.id}").status_code == 404
    assert purge_expired() == 1 and not StoredResponse.objects.filter(response_id=kept.id).exists()


@pytest.mark.parametrize(("body", "param"), [
    ({"stream": "yes"}, "stream"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "name": "f g"}]}, "tools[0].name"),
    ({"input": [{"type": "function_call_output", "output": "x"}]}, "input"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),  # chat's shape
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}, "text.format.name"),
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"reasoning_effortx": "low"}, "reasoning_effortx"),
])
def test_unsupported_and_invalid_fields_are_400s_naming_them(gateway, smollm2, body, param):
    tenant = make_tenant("resp-invalid")
    response = call(gateway, tenant, "POST", "responses", {"model": "smollm2", "input": "Hi", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    if param in ("input", "tool_choice"):  # the shape in the Responses API's terms, not chat's
        assert '"function": {' not in response.json()["error"]["message"] and "token ids" not in response.text
    validate_error(response.json())
    assert not UsageRecord.objects.filter(organization=tenant.organization).exists()


def test_text_format_json_schema_constrains_the_output(gateway, smollm2):
    tenant = make_tenant("resp-json")
    fmt = {"type": "json_schema", "name": "answer", "strict": True,
           "schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                      "additionalProperties": False}}
    created = client_for(gateway, tenant).responses.create(
        model="smollm2", input="Is water wet? Answer in JSON.", max_output_tokens=40, temperature=0,
        text={"format": fmt})
    assert created.status == "completed"
    assert isinstance(json.loads(created.output_text)["ok"], bool)
    assert created.text.format.type == "json_schema" and created.text.format.name == "answer"
    validate_response("/v1/responses", "post", 200, created.model_dump(exclude_unset=True, by_alias=True))
    bad = call(gateway, tenant, "POST", "responses", {"model": "smollm2", "input": "Hi", "text": {"format": {
        **fmt, "schema": {"type": "object", "properties": {"n": {"type": "integer", "minimum": "x"}}}}}})
    assert bad.status_code == 400, bad.text  # refused by the engine's grammar compiler, relayed
    validate_error(bad.json())


def test_a_key_is_required(gateway, smollm2):
    response = httpx.post(f"{gateway}/v1/responses", json={"model": "smollm2", "input": "Hi"}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 20}},
                          "required": ["city"], "additionalProperties": False}}
ASK = "What is the weather in Oslo? Use the tool."


def test_a_function_call_then_its_output_gives_the_final_answer(gateway, smollm2):
    tenant = make_tenant("resp-tools")
    client = client_for(gateway, tenant)
    first = client.responses.create(model="smollm2", input=ASK, tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    validate_response("/v1/responses", "post", 200, first.model_dump(exclude_unset=True))
    assert [item.type for item in first.output] == ["function_call"]
    call_item = first.output[0]
    assert call_item.name == "get_weather" and call_item.call_id and call_item.id.startswith("fc_")
    assert isinstance(json.loads(call_item.arguments)["city"], str)
    assert first.tools[0].name == "get_weather" and first.tool_choice == "required"
    plain = client.responses.create(model="smollm2", input=ASK, max_output_tokens=1, store=False)
    assert first.usage.input_tokens > plain.usage.input_tokens + 30  # the tool definitions are in the prompt

    result = {"type": "function_call_output", "call_id": call_item.call_id, "output": '{"celsius": -3, "sky": "snow"}'}
    second = client.responses.create(model="smollm2", previous_response_id=first.id, input=[result],
                                     tools=[WEATHER], tool_choice="none", max_output_tokens=30, temperature=0)
    validate_response("/v1/responses", "post", 200, second.model_dump(exclude_unset=True))
    assert [item.type for item in second.output] == ["message"] and second.output_text
    history = StoredResponse.objects.get(response_id=second.id).history
    assert [m["role"] for m in history] == ["user", "assistant", "tool", "assistant"]
    assert history[1]["tool_calls"][0]["id"] == history[2]["tool_call_id"] == call_item.call_id

    # the same conversation sent whole in `input` (no stored state) is the same prompt and answer
    whole = client.responses.create(
        model="smollm2", store=False, tools=[WEATHER], tool_choice="none", max_output_tokens=30, temperature=0,
        input=[{"role": "user", "content": ASK}, call_item.model_dump(exclude_none=True), result])
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text
    items = call(gateway, tenant, "GET", f"responses/{second.id}/input_items").json()["data"]
    assert [(i["type"], i["call_id"]) for i in items] == [("function_call_output", call_item.call_id)]
    records = UsageRecord.objects.filter(organization=tenant.organization, endpoint="responses")
    assert sorted(r.prompt_tokens for r in records) == sorted(
        r.usage.input_tokens for r in (first, plain, second, whole))
