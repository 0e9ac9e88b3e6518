"""Tight holds and honest refusals, through the gateway (uvicorn) in front of the real engine on SmolLM2:
the prompt is counted exactly with the tokenizer the engine publishes, a burst over a small quota is served
until the quota is spent (never beyond), and only then refused with insufficient_quota; a request larger
than a tokens-per-minute limit gets OpenAI's "Request too large"; the unused part of a hold is refunded
to the tokens-per-minute buckets."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx
import openai
import pytest

from accounts.models import Entitlement
from inference import prompt_count, quotas
from inference.catalog import catalog
from inference.models import Reservation, UsageRecord
from inference.quotas import hold_size
from inference.validation import parse_chat, parse_completion
from tests.processes import stop

from .conftest import add_model, make_tenant, start_gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def smollm2(engine_server):
    prompt_count.forget()
    return add_model("smollm2", engine_server, context_length=2048)


def usage_of(engine_server: str, endpoint: str, body: dict) -> int:
    answer = httpx.post(f"{engine_server}/v1/{endpoint}", json={"model": "smollm2", **body}, timeout=120).json()
    return answer["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("endpoint", "body"), [
    ("chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Héllo, what is 2+2?"}]}),
    ("chat/completions", {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": [WEATHER]}),
    ("completions", {"prompt": ["The capital of France is", "Once upon a time"]}),
])
def test_the_hold_counts_the_prompt_the_engine_sees(smollm2, engine_server, endpoint, body):
    """The gateway's count (the replica's published tokenizer and template, the catalog's tool format)
    equals the engine's usage; the hold is that plus max_tokens, not a byte bound."""
    entry = catalog.entries()["smollm2"]
    builder = prompt_count.builder_for(entry.upstreams[0])
    assert builder is not None
    parse = parse_chat if endpoint == "chat/completions" else parse_completion
    inference = parse({"model": "smollm2", **body, "max_tokens": 5})
    expected = usage_of(engine_server, endpoint, {**body, "max_tokens": 1})
    prompts = len(body.get("prompt", [None]))
    assert hold_size(inference, entry, builder) == expected + prompts * 5


def test_a_quota_of_exactly_prompt_plus_max_tokens_is_enough(gateway, smollm2, engine_server):
    messages = [{"role": "user", "content": "Say something about the sea."}]
    prompt = usage_of(engine_server, "chat/completions", {"messages": messages, "max_tokens": 1})
    tenant = make_tenant(token_quota=prompt + 8)  # the byte bound (+256 overhead) would never fit
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=120)
    answer = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8, temperature=0)
    assert answer.usage.prompt_tokens == prompt
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert entitlement.tokens_used == answer.usage.total_tokens <= entitlement.token_quota


def test_without_max_tokens_the_hold_uses_the_default_and_sends_it(gateway, smollm2):
    """No max_tokens: held with GATEWAY_DEFAULT_MAX_TOKENS (4096) capped by the context (2048) less the
    prompt, which the engine receives as max_tokens, so what it generates always fits the hold."""
    tenant = make_tenant(token_quota=2048)  # the old rule (the whole context) would not fit n=2
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=300)
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert refused.value.code == "insufficient_quota"  # prompt + 2 x (2048 - prompt) > 2048: honest
    answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                            temperature=0, stop=["."])
    assert answer.usage.total_tokens <= 2048


def test_a_burst_over_a_small_quota_spends_it_all_and_never_more(gateway, smollm2, engine_server):
    """100 concurrent requests (the SDK retrying retryable 429s as it does) on a quota for about 25: the
    quota is charged at least 90% and never over; insufficient_quota only once what is left cannot hold
    another request; every admitted request has one usage record and no hold is left behind."""
    messages = [{"role": "user", "content": "Count to five."}]
    prompt = usage_of(engine_server, "chat/completions", {"messages": messages, "max_tokens": 1})
    per_request = prompt + 16
    quota = 25 * per_request
    tenant = make_tenant(token_quota=quota)
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=8, timeout=300)

    async def one():
        try:
            answer = await client.chat.completions.create(model="smollm2", messages=messages, max_tokens=16,
                                                          temperature=1.0)
            return "ok", answer.usage.total_tokens
        except openai.RateLimitError as exc:
            return exc.code, 0

    async def burst():
        return await asyncio.gather(*(one() for _ in range(100)))

    results = asyncio.run(burst())
    outcomes = collections.Counter(code for code, _ in results)
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    charged = sum(tokens for _, tokens in results)
    assert set(outcomes) <= {"ok", "insufficient_quota"}, outcomes  # no one gave up on a held quota
    assert entitlement.tokens_used == charged <= quota
    assert charged >= 0.9 * quota, (charged, quota, outcomes)
    assert quota - entitlement.tokens_used < per_request  # refused only when another could not fit
    assert entitlement.tokens_reserved == 0 and not Reservation.objects.filter(entitlement=entitlement).exists()
    assert UsageRecord.objects.filter(organization=tenant.organization).count() == outcomes["ok"]
    print(f"burst: {dict(outcomes)}, {charged} of {quota} tokens charged ({charged / quota:.0%})")


def test_a_request_over_the_tokens_per_minute_limit_is_too_large(gateway, smollm2):
    tenant = make_tenant(tokens_per_minute=100)
    response = httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {tenant.raw_key}"},
                          json={"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                                "max_tokens": 200}, timeout=60)
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert error["message"].startswith("Request too large") and "Limit 100, Requested 2" in error["message"]


def test_the_unused_part_of_a_hold_is_refunded_to_the_tokens_per_minute_bucket(gateway, smollm2):
    """Holds of ~330 tokens under a 700-token-per-minute limit: without the refund at settlement the third
    request in the same minute would be refused; each uses far less than its hold (stops early)."""
    tenant = make_tenant(tokens_per_minute=700)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=120)
    for _ in range(4):
        answer = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=300, temperature=0, stop=["\n", ".", "!", "?"])
        assert answer.usage.total_tokens < 150


@pytest.fixture
def short_ttl_gateway(django_db_setup, redis_clean):
    """A gateway whose holds expire 3 s after their last extension."""
    url, process = start_gateway(GATEWAY_RESERVATION_TTL_SECONDS="3")
    yield url
    stop(process)


def test_a_running_stream_keeps_its_hold_past_the_expiry_sweep(short_ttl_gateway, smollm2):
    """A stream running far longer than the reservation TTL: the sweep (run here every second, as Celery
    beat would) never releases its hold, so nobody else can take its room and its settlement charges
    everything it generated."""
    tenant = make_tenant(token_quota=2000)
    client = openai.OpenAI(base_url=f"{short_ttl_gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=300)
    started = time.monotonic()
    released = 0
    with client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Tell a story."}],
                                        max_tokens=300, temperature=0, stream=True, extra_body={"ignore_eos": True},
                                        stream_options={"include_usage": True}) as stream:
        last_sweep = started
        for chunk in stream:
            if time.monotonic() - last_sweep > 1:
                released += quotas.expire_reservations()
                last_sweep = time.monotonic()
            if chunk.usage:
                usage = chunk.usage
    assert time.monotonic() - started > 6  # two TTLs at least: the hold was extended
    assert released == 0
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert record.completion_tokens == usage.completion_tokens == 300
    assert entitlement.tokens_used == usage.total_tokens and entitlement.tokens_reserved == 0
