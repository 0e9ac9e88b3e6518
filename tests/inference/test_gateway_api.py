"""The /v1/ API through a real uvicorn gateway process in front of the stub upstream process,
driven with the official openai SDK (sync and async) and raw httpx where the wire format matters."""

from __future__ import annotations

import datetime as dt

import httpx
import openai
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.utils import timezone

from accounts.models import Entitlement
from inference.models import AIModel, Reservation, UsageRecord, UsageStatus, Visibility

from .conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def stub_model(stub_upstream):
    return add_model("stub-model", stub_upstream, price_input_per_million=1, price_output_per_million=2)


@pytest.fixture
def tenant(stub_model):
    return make_tenant()


def client_for(gateway: str, raw_key: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=raw_key, max_retries=0, **kw)


def usage_rows():
    return list(UsageRecord.objects.order_by("created_at"))


def test_chat_sync_non_stream_records_usage_and_forwards_salt_and_request_id(gateway, stub_upstream, tenant):
    client = client_for(gateway, tenant.raw_key)
    raw = client.chat.completions.with_raw_response.create(model="stub-model", messages=MESSAGES, max_tokens=5)
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 5
    request_id = raw.headers["x-request-id"]
    assert request_id.startswith("req_")
    assert int(raw.headers["openai-processing-ms"]) >= 0

    [row] = usage_rows()
    assert row.request_id == request_id and row.status == UsageStatus.OK and not row.stream
    assert (row.prompt_tokens, row.completion_tokens) == (completion.usage.prompt_tokens, 5)
    assert row.api_key_id == tenant.api_key.pk and row.user_id == tenant.user.pk
    assert row.deployment_id is not None and row.model_name == "stub-model"
    assert row.cost == (row.prompt_tokens * 1 + 5 * 2) / __import__("decimal").Decimal(1_000_000)
    assert row.latency_ms > 0 and row.time_to_first_token_ms is not None
    ent = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert ent.tokens_used == row.prompt_tokens + 5 and ent.tokens_reserved == 0
    assert not Reservation.objects.exists()

    seen = httpx.get(f"{stub_upstream}/_requests").json()["received"]
    forwarded = [r for r in seen if r["headers"].get("x-request-id") == request_id]
    assert forwarded and forwarded[0]["body"]["cache_salt"] == tenant.organization.cache_salt


def test_chat_sync_stream_strips_usage_chunk_unless_asked(gateway, stub_upstream, tenant):
    client = client_for(gateway, tenant.raw_key)
    chunks = list(client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the stub"

    chunks = list(client.chat.completions.create(
        model="stub-model", messages=MESSAGES, max_tokens=4, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    rows = usage_rows()
    assert [r.stream for r in rows] == [True, True] and all(r.status == UsageStatus.OK for r in rows)
    assert all(r.completion_tokens == 4 for r in rows)
    seen = httpx.get(f"{stub_upstream}/_requests").json()["received"]
    assert all(r["body"]["stream_options"]["include_usage"] for r in seen if r["body"].get("stream"))


async def test_async_client_chat_and_completions(gateway, tenant):
    client = openai.AsyncOpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)
    completion = await client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=3)
    assert completion.usage.completion_tokens == 3
    stream = await client.completions.create(model="stub-model", prompt="Once upon", max_tokens=3, stream=True)
    text = "".join([c.choices[0].text async for c in stream if c.choices])
    assert text == "Hello from the"
    legacy = await client.completions.create(model="stub-model", prompt="Once upon")
    assert legacy.usage.completion_tokens == 8  # the stub caps at 8; the gateway sent OpenAI's default 16
    await client.close()
    assert await sync_to_async(count_and_close)() == 3


def count_and_close() -> int:
    try:
        return UsageRecord.objects.count()
    finally:
        connections.close_all()


def test_models_list_and_retrieve_show_only_usable_models(gateway, stub_upstream, tenant):
    other = make_tenant("other")
    hidden = add_model("hidden-model", stub_upstream, visibility=Visibility.LISTED)
    hidden.organizations.add(other.organization)
    add_model("disabled-model", stub_upstream, enabled=False)
    client = client_for(gateway, tenant.raw_key)
    assert [m.id for m in client.models.list()] == ["stub-model"]
    assert client.models.retrieve("stub-model").owned_by == "maas"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("hidden-model")
    assert err.value.code == "model_not_found"
    assert sorted(m.id for m in client_for(gateway, other.raw_key).models.list()) == ["hidden-model", "stub-model"]


def test_authentication_failures_are_401(gateway, tenant):
    for raw in ["", "sk-nope", "sk-0123456789abcdef-" + "x" * 40]:
        with pytest.raises(openai.AuthenticationError) as err:
            client_for(gateway, raw or "missing").chat.completions.create(model="stub-model", messages=MESSAGES)
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    response = httpx.post(f"{gateway}/v1/chat/completions", json={"model": "stub-model", "messages": MESSAGES})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    response = httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Basic {tenant.raw_key}"}, json={})
    assert response.status_code == 401

    tenant.api_key.revoke()
    with pytest.raises(openai.AuthenticationError):
        client_for(gateway, tenant.raw_key).chat.completions.create(model="stub-model", messages=MESSAGES)
    expired = make_tenant("expired", expires_at=timezone.now() - dt.timedelta(seconds=1))
    with pytest.raises(openai.AuthenticationError):
        client_for(gateway, expired.raw_key).models.list()
    assert not UsageRecord.objects.exists()


def test_no_active_entitlement_is_403_without_retry(gateway, tenant):
    Entitlement.objects.filter(pk=tenant.entitlement.pk).update(revoked_at=timezone.now())
    client = client_for(gateway, tenant.raw_key)
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES)
    assert err.value.code == "authorization_required"
    assert err.value.response.headers["x-should-retry"] == "false"
    Entitlement.objects.filter(pk=tenant.entitlement.pk).update(
        revoked_at=None, ends_at=timezone.now() - dt.timedelta(seconds=1)
    )
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="stub-model", messages=MESSAGES)


def test_model_outside_allowlist_entitlement_or_visibility_is_404(gateway, stub_upstream, stub_model):
    add_model("second-model", stub_upstream)
    restricted_key = make_tenant("keyallow", allowed_models=["second-model"])
    restricted_grant = make_tenant("grant", model_names=["second-model"])
    unrestricted = make_tenant("open")
    listed = add_model("listed-model", stub_upstream, visibility=Visibility.LISTED)
    for tenant, model in [
        (restricted_key, "stub-model"), (restricted_grant, "stub-model"), (unrestricted, "listed-model"),
        (restricted_key, "no-such-model"),
    ]:
        with pytest.raises(openai.NotFoundError) as err:
            client_for(gateway, tenant.raw_key).chat.completions.create(model=model, messages=MESSAGES)
        assert err.value.code == "model_not_found" and model in err.value.message
    ok = client_for(gateway, restricted_grant.raw_key).chat.completions.create(model="second-model", messages=MESSAGES)
    assert ok.choices[0].message.content
    # Listing the organization makes the listed model callable for it, and only for it.
    listed.organizations.add(unrestricted.organization)
    assert client_for(gateway, unrestricted.raw_key).chat.completions.create(
        model="listed-model", messages=MESSAGES).choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        client_for(gateway, restricted_grant.raw_key).chat.completions.create(model="listed-model", messages=MESSAGES)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES}, "model"),
        ({"model": "stub-model"}, "messages"),
        ({"model": "stub-model", "messages": []}, "messages"),
        ({"model": "stub-model", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "stub-model", "messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"model": "stub-model", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"model": "stub-model", "messages": MESSAGES, "n": "2"}, "n"),
        ({"model": "stub-model", "messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_bodies_are_400_with_param(gateway, tenant, body, param):
    response = httpx.post(f"{gateway}/v1/chat/completions", json=body,
                          headers={"authorization": f"Bearer {tenant.raw_key}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    assert not UsageRecord.objects.exists()


def test_sdk_raises_bad_request_extensions_pass_through_and_unknown_fields_are_refused(gateway, stub_upstream,
                                                                                       tenant):
    client = client_for(gateway, tenant.raw_key)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES, top_p=2)
    assert err.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES, extra_body={"frobnicate": 1})
    assert err.value.param == "frobnicate" and err.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES, extra_body={"functions": [{"name": "f"}]})
    assert err.value.param == "functions" and err.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES, response_format={"type": "grammar"})
    assert err.value.param == "response_format.type"
    client.chat.completions.create(model="stub-model", messages=MESSAGES, extra_body={"top_k": 5})
    seen = httpx.get(f"{stub_upstream}/_requests").json()["received"]
    assert seen[-1]["body"]["top_k"] == 5


def test_every_error_under_v1_is_openai_json(gateway, tenant):
    auth = {"authorization": f"Bearer {tenant.raw_key}"}
    cases = [
        httpx.get(f"{gateway}/v1/nope", headers=auth),
        httpx.get(f"{gateway}/v1", headers=auth),
        httpx.get(f"{gateway}/v1/chat/completions", headers=auth),
        httpx.delete(f"{gateway}/v1/models", headers=auth),
        httpx.post(f"{gateway}/v1/chat/completions", content=b"{not json", headers=auth),
    ]
    assert [r.status_code for r in cases] == [404, 404, 405, 405, 400]
    for response in cases:
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.headers["x-request-id"]


def test_errors_raised_before_the_views_are_openai_json_too(gateway):
    response = httpx.get(f"{gateway}/v1/models", headers={"host": "not-allowed.example"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    console = httpx.get(f"{gateway}/usage/", headers={"host": "not-allowed.example"})
    assert console.status_code == 400 and "application/json" not in console.headers["content-type"]


def test_over_quota_is_429_insufficient_quota_without_retry(gateway, stub_model):
    tenant = make_tenant("small", token_quota=300)
    client = client_for(gateway, tenant.raw_key)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES)  # reserves the whole context
    assert err.value.code == "insufficient_quota"
    assert err.value.response.headers["x-should-retry"] == "false"
    assert not UsageRecord.objects.exists()
    ok = client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=5)  # bound fits
    assert ok.usage.completion_tokens == 5


def test_rate_limit_429_with_openai_headers(gateway, stub_model):
    tenant = make_tenant("limited", requests_per_minute=2, tokens_per_minute=100_000)
    client = client_for(gateway, tenant.raw_key)
    first = client.chat.completions.with_raw_response.create(model="stub-model", messages=MESSAGES, max_tokens=5)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"] == "30s"
    assert first.headers["x-ratelimit-limit-tokens"] == "100000"
    assert int(first.headers["x-ratelimit-remaining-tokens"]) < 100_000
    client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=5)
    with pytest.raises(openai.RateLimitError) as err:
        client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=5)
    headers = err.value.response.headers
    assert err.value.code == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-should-retry" not in headers
    assert UsageRecord.objects.count() == 2


def test_rate_limit_headers_on_every_response_from_platform_defaults(gateway, stub_model, settings):
    tenant = make_tenant("unlimited")  # neither the key nor the organization sets a limit
    client = client_for(gateway, tenant.raw_key)
    reply = client.chat.completions.with_raw_response.create(model="stub-model", messages=MESSAGES, max_tokens=5)
    assert reply.headers["x-ratelimit-limit-requests"] == str(settings.GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE)
    assert int(reply.headers["x-ratelimit-remaining-requests"]) == settings.GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE - 1
    assert reply.headers["x-ratelimit-limit-tokens"] == str(settings.GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE)
    assert reply.headers["x-ratelimit-reset-requests"].endswith("s")


def test_org_concurrency_cap(gateway, stub_model):
    tenant = make_tenant("conc")
    tenant.organization.max_concurrent_requests = 1
    tenant.organization.save()
    auth = {"authorization": f"Bearer {tenant.raw_key}"}
    body = {"model": "stub-model", "messages": MESSAGES, "max_tokens": 40, "stream": True, "user": "stub:slow_stream"}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, headers=auth, timeout=30) as held:
        assert held.status_code == 200
        second = httpx.post(f"{gateway}/v1/chat/completions", json={**body, "stream": False}, headers=auth)
        assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"
        held.read()
    third = httpx.post(f"{gateway}/v1/chat/completions", json={**body, "user": "stub:ok"}, headers=auth)
    assert third.status_code == 200


def test_model_catalog_changes_apply(gateway, stub_model, tenant):
    AIModel.objects.filter(pk=stub_model.pk).update(enabled=False)
    with pytest.raises(openai.NotFoundError):
        client_for(gateway, tenant.raw_key).chat.completions.create(model="stub-model", messages=MESSAGES)


def test_the_catalog_tool_format_is_sent_with_every_chat_request(gateway, stub_upstream, tenant, stub_model):
    """The model's catalog `tool_format` overrides what a client sends; legacy completions get none."""
    stub_model.tool_format = "hermes"
    stub_model.save()  # the test gateway reads the catalog on every request (GATEWAY_CATALOG_CACHE_SECONDS=0)
    client = client_for(gateway, tenant.raw_key)
    chat = client.chat.completions.with_raw_response.create(model="stub-model", messages=MESSAGES, max_tokens=2,
                                                            extra_body={"tool_format": "auto"})
    legacy = client.completions.with_raw_response.create(model="stub-model", prompt="Hi", max_tokens=2)
    seen = {r["headers"].get("x-request-id"): r["body"] for r in httpx.get(f"{stub_upstream}/_requests").json()["received"]}
    assert seen[chat.headers["x-request-id"]]["tool_format"] == "hermes"
    assert "tool_format" not in seen[legacy.headers["x-request-id"]]
