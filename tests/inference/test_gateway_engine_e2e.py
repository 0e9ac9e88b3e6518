"""End to end: the openai SDK → the gateway (uvicorn, maas.asgi) → `python -m engine serve` on SmolLM2,
with PostgreSQL and Redis. Keys come from redeemed authorization codes."""

from __future__ import annotations

import asyncio
import json
import re
import time
from decimal import Decimal

import httpx
import openai
import pytest
from asgiref.sync import sync_to_async

from accounts.models import Entitlement
from inference.models import AIModel, Reservation, UsageRecord, UsageStatus

from .conftest import add_model, in_thread, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def smollm2(engine_server):
    return add_model("smollm2", engine_server, context_length=2048, price_input_per_million=1, price_output_per_million=4)


def sync_client(gateway, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=120)


def async_client(gateway, tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=300)


async def test_redeemed_key_chats_sync_async_stream_and_not(gateway, smollm2):
    tenant = await in_thread(make_tenant)
    client = sync_client(gateway, tenant)

    def sync_calls():
        plain = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=6)
        assert plain.choices[0].message.content and plain.usage.completion_tokens <= 6
        chunks = list(client.chat.completions.create(
            model="smollm2", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        legacy = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4)
        assert legacy.choices[0].text
        return plain.usage.prompt_tokens

    prompt_tokens = await sync_to_async(sync_calls, thread_sensitive=False)()
    aclient = async_client(gateway, tenant)
    plain = await aclient.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=5)
    assert plain.usage.prompt_tokens == prompt_tokens
    stream = await aclient.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=5, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)  # usage was requested upstream, stripped for this client
    await aclient.close()

    def check():
        rows = list(UsageRecord.objects.filter(organization=tenant.organization))
        assert len(rows) == 5 and {r.status for r in rows} == {UsageStatus.OK}
        assert sorted(r.stream for r in rows) == [False, False, False, True, True]
        entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
        assert entitlement.tokens_used == sum(r.prompt_tokens + r.completion_tokens for r in rows)
        assert entitlement.tokens_reserved == 0 and not Reservation.objects.exists()
        assert all(r.cost > 0 and r.user_id == tenant.user.pk for r in rows)

    await in_thread(check)


def test_sdk_exception_classes_against_the_engine(gateway, smollm2, stub_upstream):
    tenant = make_tenant("errors", token_quota=400, requests_per_minute=3)
    client = sync_client(gateway, tenant)
    assert client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=4).choices
    with pytest.raises(openai.RateLimitError) as quota:
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=450)  # > 400 in all
    assert quota.value.code == "insufficient_quota"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=4)
    assert client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2).choices

    # Refused holds count as requests: two of them use up a limit of 2 a minute (never reaching the engine,
    # so the bucket cannot refill in between), and the third request is rate limited.
    limited = sync_client(gateway, make_tenant("limited", token_quota=10, requests_per_minute=2))
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as refused:
            limited.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2)
        assert refused.value.code == "insufficient_quota"
    with pytest.raises(openai.RateLimitError) as rate:
        limited.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2)
    assert rate.value.code == "rate_limit_exceeded"

    no_grant = make_tenant("nogrant")
    Entitlement.objects.filter(pk=no_grant.entitlement.pk).delete()
    with pytest.raises(openai.PermissionDeniedError):
        sync_client(gateway, no_grant).chat.completions.create(model="smollm2", messages=MESSAGES)
    tenant.api_key.revoke()
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2)


def metric_sum(engine_url: str, name: str) -> float:
    text = httpx.get(f"{engine_url}/metrics").text
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


def generated_tokens(engine_url: str) -> float:
    return metric_sum(engine_url, "engine_generation_tokens_total")


def engine_busy(engine_url: str) -> bool:
    return metric_sum(engine_url, "engine_num_requests_running") + metric_sum(engine_url, "engine_num_requests_waiting") > 0


def test_client_disconnect_against_the_engine(gateway, smollm2, engine_server):
    tenant = make_tenant("disconnect")
    generated_before = generated_tokens(engine_server)
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a long story about a cat."}],
            "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {tenant.raw_key}"}, timeout=60) as response:
        assert response.status_code == 200
        received = []
        for line in response.iter_lines():
            if line.startswith("data:") and '"content": ""' not in line:
                received.append(line)
            if len(received) == 5:
                break
    deadline = time.monotonic() + 20
    while not UsageRecord.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    row = UsageRecord.objects.get()
    assert row.status == UsageStatus.CLIENT_DISCONNECTED
    expected_prompt = httpx.post(f"{engine_server}/tokenize", json={"messages": body["messages"]}).json()["count"]
    assert row.prompt_tokens == expected_prompt
    assert 5 <= row.completion_tokens < 400
    # never charged for more than the engine generated for it (it stops once the gateway hangs up)
    deadline = time.monotonic() + 20
    while engine_busy(engine_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert row.completion_tokens <= generated_tokens(engine_server) - generated_before
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (row.prompt_tokens + row.completion_tokens, 0)


async def test_100_concurrent_requests_never_exceed_quota(gateway, smollm2):
    # One reservation: the prompt as the engine counts it (its tokenizer and template) + 4 completion tokens;
    # 100 of them do not fit 1000 tokens.
    tenant = await in_thread(lambda: make_tenant("crowd", token_quota=1000, requests_per_minute=100_000))
    client = async_client(gateway, tenant)

    async def one(i: int):
        try:
            raw = await client.chat.completions.with_raw_response.create(model="smollm2", messages=MESSAGES, max_tokens=4)
            return "ok", raw.headers["x-request-id"]
        except openai.RateLimitError as exc:
            return exc.code, exc.response.headers["x-request-id"]

    results = await asyncio.gather(*(one(i) for i in range(100)))
    await client.close()
    admitted = [rid for outcome, rid in results if outcome == "ok"]
    refused = [outcome for outcome, _ in results if outcome != "ok"]
    assert set(refused) <= {"insufficient_quota", "quota_in_flight"}  # no retries in this client
    assert 10 <= len(admitted) < 100

    def check():
        entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
        rows = list(UsageRecord.objects.filter(organization=tenant.organization))
        assert entitlement.tokens_used <= entitlement.token_quota
        assert entitlement.tokens_reserved == 0 and not Reservation.objects.exists()
        assert sorted(r.request_id for r in rows) == sorted(admitted)  # exactly one row per admitted request
        assert entitlement.tokens_used == sum(r.prompt_tokens + r.completion_tokens for r in rows)
        return entitlement.tokens_used

    used = await in_thread(check)
    print(f"admitted {len(admitted)} of 100, {used} of 1000 tokens used")


def test_several_prompts_through_the_gateway_are_held_answered_and_billed_together(gateway, smollm2):
    from tests.openapi_spec import validate_response, validate_stream

    tenant = make_tenant()
    auth = {"Authorization": f"Bearer {tenant.raw_key}"}
    body = {"model": "smollm2", "prompt": ["The capital of France is", "One, two,"], "n": 2, "max_tokens": 3,
            "temperature": 0, "ignore_eos": True}
    whole = httpx.post(f"{gateway}/v1/completions", headers=auth, json=body, timeout=120)
    assert whole.status_code == 200, whole.text
    validate_response("/v1/completions", "post", 200, whole.json())
    assert [c["index"] for c in whole.json()["choices"]] == [0, 1, 2, 3]
    usage = whole.json()["usage"]
    assert usage["completion_tokens"] == 12
    streamed = httpx.post(f"{gateway}/v1/completions", headers=auth, json={**body, "stream": True}, timeout=120)
    chunks = validate_stream("/v1/completions", "post", streamed.text)
    texts = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {c["index"]: c["text"] for c in whole.json()["choices"]}
    rows = list(UsageRecord.objects.filter(organization=tenant.organization).order_by("created_at"))
    assert [(r.prompt_tokens, r.completion_tokens) for r in rows] == [(usage["prompt_tokens"], 12)] * 2
    assert all(r.status == UsageStatus.OK for r in rows)
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert entitlement.tokens_reserved == 0 and entitlement.tokens_used == 2 * usage["total_tokens"]


LONG_MESSAGES = [{"role": "user", "content": "Here is a list of fruits: " + ", ".join(
    ["apple", "banana", "cherry", "date", "elderberry", "fig", "grape"] * 12) + ". Which one is red?"}]


def test_cached_tokens_are_recorded_and_billed_at_the_cached_price(gateway, engine_server):
    """The engine's prefix cache: the same prompt again reports cached tokens; the gateway records them
    and bills them at the cached-input price (the stub upstream always reports 0)."""
    add_model("smollm2", engine_server, price_input_per_million=3, price_cached_input_per_million=1,
              price_output_per_million=5)
    tenant = make_tenant("cached")
    client = sync_client(gateway, tenant)
    first = client.chat.completions.create(model="smollm2", messages=LONG_MESSAGES, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model="smollm2", messages=LONG_MESSAGES, max_tokens=3, temperature=0)
    chunks = list(client.chat.completions.create(model="smollm2", messages=LONG_MESSAGES, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage
    for usage in (again.usage, streamed):
        cached = usage.prompt_tokens_details.cached_tokens
        assert cached >= 64 and cached % 16 == 0 and cached < usage.prompt_tokens  # most of the prompt
    rows = list(UsageRecord.objects.filter(organization=tenant.organization).order_by("created_at"))
    assert [r.stream for r in rows] == [False, False, True]
    for row, usage in zip(rows, [first.usage, again.usage, streamed], strict=True):
        cached = usage.prompt_tokens_details.cached_tokens
        assert (row.prompt_tokens, row.cached_tokens, row.completion_tokens) == (
            usage.prompt_tokens, cached, usage.completion_tokens)
        expected = (Decimal(row.prompt_tokens - cached) * 3 + Decimal(cached) * 1
                    + Decimal(row.completion_tokens) * 5) / Decimal(1_000_000)
        assert row.cost == expected.quantize(Decimal("0.00000001"))


def test_a_cut_stream_records_its_cached_tokens_at_the_cached_price(gateway, engine_server):
    """A stream the client cuts after a few chunks, on a prompt the prefix cache holds: the record keeps the
    cached tokens the engine reported with its chunks (the gateway asks for the usage so far on every chunk
    and takes it out again: the client, who did not ask for it, sees none) and prices them as cached."""
    add_model("smollm2", engine_server, price_input_per_million=3, price_cached_input_per_million=1,
              price_output_per_million=5)
    tenant = make_tenant("cut-cached")
    client = sync_client(gateway, tenant)
    client.chat.completions.create(model="smollm2", messages=LONG_MESSAGES, max_tokens=1, temperature=0)
    body = {"model": "smollm2", "messages": LONG_MESSAGES, "max_tokens": 400, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {tenant.raw_key}"}, timeout=60) as response:
        assert response.status_code == 200
        received = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                received.append(json.loads(line[5:]))
            if len(received) == 6:  # the role chunk and five generated ones
                break
    assert all("usage" in chunk and chunk["usage"] is None for chunk in received)  # include_usage's nulls only
    deadline = time.monotonic() + 20
    while UsageRecord.objects.filter(organization=tenant.organization).count() < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    row = UsageRecord.objects.filter(organization=tenant.organization).order_by("created_at").last()
    assert row.status == UsageStatus.CLIENT_DISCONNECTED and row.stream
    assert row.cached_tokens >= 64 and row.cached_tokens % 16 == 0 and row.cached_tokens < row.prompt_tokens
    assert row.completion_tokens >= 5
    expected = (Decimal(row.prompt_tokens - row.cached_tokens) * 3 + Decimal(row.cached_tokens) * 1
                + Decimal(row.completion_tokens) * 5) / Decimal(1_000_000)
    assert row.cost == expected.quantize(Decimal("0.00000001"))


def test_a_client_asking_for_the_usage_so_far_gets_it_on_every_chunk(gateway, smollm2):
    """vLLM's continuous_usage_stats passes through: each chunk with choices carries the usage so far."""
    tenant = make_tenant("progress")
    chunks = list(sync_client(gateway, tenant).chat.completions.create(
        model="smollm2", messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {
            "include_usage": True, "continuous_usage_stats": True}}))
    progress = [c.usage.completion_tokens for c in chunks[1:-1] if c.choices]
    assert progress and progress == sorted(progress) and progress[-1] <= chunks[-1].usage.completion_tokens
    assert chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("stream", [False, True])
def test_engine_context_length_refusal_is_relayed_and_recorded(gateway, engine_server, stream):
    """The catalog allows 8192 tokens, the engine 2048: the engine's 400 context_length_exceeded reaches the
    client as it is, recorded as rejected upstream, and nothing is charged."""
    AIModel.objects.filter(name="smollm2").delete()
    add_model("smollm2", engine_server, context_length=8192, price_input_per_million=1)
    tenant = make_tenant("toolong")
    too_long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as err:
        sync_client(gateway, tenant).chat.completions.create(model="smollm2", messages=too_long, max_tokens=16,
                                                             stream=stream)
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert "2048" in err.value.message
    row = UsageRecord.objects.get(organization=tenant.organization)
    assert (row.status, row.http_status, row.stream) == (UsageStatus.REJECTED_UPSTREAM, 400, stream)
    assert (row.prompt_tokens, row.completion_tokens, row.cost) == (0, 0, 0)
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (0, 0)


def test_a_cut_echo_stream_is_not_billed_its_echoed_prompt_as_completion(gateway, smollm2, engine_server):
    """With echo the first chunk is the prompt's text: a stream cut by the client is billed the prompt as
    prompt and only the generated text as completion (never more than the engine generated)."""
    tenant = make_tenant("echo-cut")
    generated_before = generated_tokens(engine_server)
    prompt = "The history of the printing press begins in the fifteenth century, when movable type " * 3
    body = {"model": "smollm2", "prompt": prompt, "echo": True, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{gateway}/v1/completions", json=body,
                      headers={"authorization": f"Bearer {tenant.raw_key}"}, timeout=60) as response:
        assert response.status_code == 200
        received = []
        for line in response.iter_lines():
            if line.startswith("data:"):
                received.append(line)
            if len(received) == 6:  # the echo and five generated chunks
                break
    assert prompt in received[0]  # the echo came first
    deadline = time.monotonic() + 20
    while not UsageRecord.objects.filter(organization=tenant.organization).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    row = UsageRecord.objects.get(organization=tenant.organization)
    assert row.status == UsageStatus.CLIENT_DISCONNECTED
    assert row.prompt_tokens == httpx.post(f"{engine_server}/tokenize", json={"prompt": prompt}).json()["count"]
    deadline = time.monotonic() + 20
    while engine_busy(engine_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert 5 <= row.completion_tokens <= generated_tokens(engine_server) - generated_before < row.prompt_tokens


def test_a_non_streamed_request_whose_client_leaves_is_billed_its_prompt(gateway, smollm2, engine_server):
    """The client gives up on a long non-streamed answer (before or after the engine's 200): the record
    says client_disconnected (not ok with 0 tokens) and the prompt the engine was given is billed, counted
    by the gateway's own tokenizer."""
    tenant = make_tenant("leaves")
    messages = [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {tenant.raw_key}"},
                   json={"model": "smollm2", "messages": messages, "max_tokens": 400, "ignore_eos": True},
                   timeout=httpx.Timeout(60, read=1.5))
    deadline = time.monotonic() + 20
    while not UsageRecord.objects.filter(organization=tenant.organization).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    row = UsageRecord.objects.get(organization=tenant.organization)
    assert (row.status, row.http_status) == (UsageStatus.CLIENT_DISCONNECTED, 499)
    assert row.prompt_tokens == httpx.post(f"{engine_server}/tokenize", json={"messages": messages}).json()["count"]
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (row.prompt_tokens + row.completion_tokens, 0)
