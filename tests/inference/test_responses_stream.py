"""/v1/responses with `stream: true` end to end: the openai SDK (and raw SSE, validated event by event
against OpenAI's spec) → the gateway → `python -m engine serve` on SmolLM2, with PostgreSQL: the streamed
text, usage and billing, storage, `max_output_tokens` cuts, client disconnects and streamed function calls."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from accounts.models import Entitlement
from inference.models import StoredResponse, UsageRecord, UsageStatus
from tests.openapi_spec import validate_events

from .conftest import add_model, make_tenant
from .test_responses_gateway import ASK, WEATHER, client_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TEXT_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
               "response.content_part.added"]
CLOSING_EVENTS = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture
def smollm2(engine_server):
    return add_model("smollm2", engine_server, context_length=2048, price_input_per_million=1,
                     price_output_per_million=4)


def stream_raw(gateway, tenant, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{gateway}/v1/responses", json={"model": "smollm2", "stream": True, **body},
                      headers={"authorization": f"Bearer {tenant.raw_key}"}, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    return validate_events("/v1/responses", "post", text)


def test_streamed_text_equals_the_non_streamed_answer_and_is_billed_once(gateway, smollm2):
    tenant = make_tenant("resp-stream")
    client = client_for(gateway, tenant)
    ask = {"model": "smollm2", "input": "Name three colors.", "max_output_tokens": 24, "temperature": 0}
    whole = client.responses.create(**ask, store=False)

    with client.responses.stream(**ask) as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1 and "".join(deltas) == final.output_text == whole.output_text
    assert final.status == whole.status and final.id.startswith("resp_")
    record = UsageRecord.objects.get(organization=tenant.organization, stream=True)
    assert (record.endpoint, record.status) == ("responses", UsageStatus.OK)
    assert (record.prompt_tokens, record.completion_tokens) == (final.usage.input_tokens, final.usage.output_tokens)
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.input_tokens_details.cached_tokens == record.cached_tokens
    assert final.usage.total_tokens == record.prompt_tokens + record.completion_tokens
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert entitlement.tokens_reserved == 0
    assert entitlement.tokens_used == whole.usage.total_tokens + final.usage.total_tokens
    # stored once complete: retrieve gives the final response, and it continues a conversation
    again = client.responses.retrieve(final.id)
    assert (again.output_text, again.status, again.usage) == (final.output_text, final.status, final.usage)
    assert StoredResponse.objects.get(response_id=final.id).history[-1] == {"role": "assistant",
                                                                            "content": final.output_text}

    events = stream_raw(gateway, tenant, {**ask, "store": False})
    types = [e["type"] for e in events]
    deltas = types.count("response.output_text.delta")
    assert types == TEXT_EVENTS + ["response.output_text.delta"] * deltas + CLOSING_EVENTS + [
        f"response.{whole.status}"], types
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == whole.output_text
    assert events[-4]["text"] == events[-1]["response"]["output"][0]["content"][0]["text"] == whole.output_text
    assert events[-1]["response"]["usage"]["output_tokens"] == whole.usage.output_tokens
    assert not StoredResponse.objects.filter(response_id=events[0]["response"]["id"]).exists()  # store: false


def test_a_stream_cut_by_max_output_tokens_ends_incomplete_and_is_stored_so(gateway, smollm2):
    tenant = make_tenant("resp-stream-cut")
    events = stream_raw(gateway, tenant, {"input": "Write a long story about a cat.", "max_output_tokens": 3})
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["response"]["status"] == "incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["response"]["usage"]["output_tokens"] == 3
    stored = StoredResponse.objects.get(response_id=final["response"]["id"])
    assert stored.body == final["response"]
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert (record.status, record.completion_tokens, record.stream) == (UsageStatus.OK, 3, True)


def test_a_client_that_disconnects_is_billed_like_a_cut_chat_stream_and_nothing_is_stored(gateway, smollm2):
    tenant = make_tenant("resp-stream-gone")
    body = {"model": "smollm2", "input": "Write a long story about a cat.", "max_output_tokens": 400,
            "stream": True}
    with httpx.stream("POST", f"{gateway}/v1/responses", json=body,
                      headers={"authorization": f"Bearer {tenant.raw_key}"}, timeout=60) as response:
        events = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
            if sum(e["type"] == "response.output_text.delta" for e in events) == 3:
                break
    deadline = time.monotonic() + 20
    while not UsageRecord.objects.filter(organization=tenant.organization).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert (record.endpoint, record.status, record.stream) == ("responses", UsageStatus.CLIENT_DISCONNECTED, True)
    assert 3 <= record.completion_tokens < 400 and record.prompt_tokens > 5
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (record.prompt_tokens + record.completion_tokens, 0)
    assert not StoredResponse.objects.filter(response_id=events[0]["response"]["id"]).exists()


def test_a_streamed_function_call_is_its_own_item_with_its_arguments_events(gateway, smollm2):
    tenant = make_tenant("resp-stream-tools")
    client = client_for(gateway, tenant)
    ask = {"model": "smollm2", "input": ASK, "tools": [WEATHER], "tool_choice": "required",
           "parallel_tool_calls": False, "max_output_tokens": 40, "temperature": 0}
    whole = client.responses.create(**ask, store=False)
    events = stream_raw(gateway, tenant, ask)
    types = [e["type"] for e in events]
    deltas = [e for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert deltas and types == [
        "response.created", "response.in_progress", "response.output_item.added",
        *["response.function_call_arguments.delta"] * len(deltas), "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"], types
    added, (done, item_done, completed) = events[2], events[-3:]
    assert added["item"]["type"] == "function_call" and added["item"]["status"] == "in_progress"
    assert {e["item_id"] for e in [*deltas, done]} == {added["item"]["id"]} == {item_done["item"]["id"]}
    expected = whole.output[0]
    assert (done["name"], done["arguments"]) == (expected.name, expected.arguments)
    assert done["name"] == "get_weather" and "".join(e["delta"] for e in deltas) == done["arguments"]
    [call_item] = completed["response"]["output"]
    assert call_item == item_done["item"] and call_item["call_id"] == added["item"]["call_id"]
    assert StoredResponse.objects.get(response_id=completed["response"]["id"]).history[-1]["tool_calls"][0][
        "function"] == {"name": "get_weather", "arguments": expected.arguments}

    with client.responses.stream(**ask, store=False) as stream:
        final = stream.get_final_response()
    assert [(i.type, i.name, i.arguments) for i in final.output] == [("function_call", "get_weather",
                                                                      expected.arguments)]
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_an_engine_failure_midway_ends_with_error_and_response_failed_billed_and_not_stored(gateway, stub_upstream):
    add_model("stub-model", stub_upstream)
    tenant = make_tenant("resp-stream-broken")
    with httpx.stream("POST", f"{gateway}/v1/responses", headers={"authorization": f"Bearer {tenant.raw_key}"},
                      json={"model": "stub-model", "input": "Tell me a story", "max_output_tokens": 8,
                            "stream": True, "user": "stub:close_midway"}, timeout=60) as response:
        events = validate_events("/v1/responses", "post", response.read().decode())
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Hello from the"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["content"][0]["text"] == "Hello from the"
    deadline = time.monotonic() + 20  # the settlement of a broken stream may finish just after its last event
    while not UsageRecord.objects.filter(organization=tenant.organization).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert (record.endpoint, record.status, record.completion_tokens) == ("responses", UsageStatus.UPSTREAM_ERROR, 3)
    assert not StoredResponse.objects.filter(response_id=failed["id"]).exists()
