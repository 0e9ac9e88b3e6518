"""/v1/embeddings end to end: the openai SDK → the gateway (uvicorn, maas.asgi) → `python -m engine serve` on
all-MiniLM-L6-v2, with PostgreSQL and Redis: vectors, quota hold and settlement, one usage record, model
kinds and tenant isolation."""

from __future__ import annotations

import base64
import struct
from decimal import Decimal

import httpx
import openai
import pytest

from accounts.models import Entitlement
from inference.models import ModelKind, Reservation, UsageRecord, UsageStatus
from tests.openapi_spec import validate_error, validate_response

from .conftest import EMBEDDING_MODEL, add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SENTENCES = ["A quiet lake at dawn.", "Mist over still water in the early morning.", "Interest rates rose again."]


@pytest.fixture
def minilm(embedding_server):
    return add_model(EMBEDDING_MODEL, embedding_server, context_length=256, kind=ModelKind.EMBEDDINGS,
                     price_input_per_million=2)


def client_for(gateway, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=120)


def post(gateway: str, key: str, body: dict, path: str = "embeddings") -> httpx.Response:
    return httpx.post(f"{gateway}/v1/{path}", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


def direct(engine: str, body: dict) -> list[list[float]]:
    response = httpx.post(f"{engine}/v1/embeddings", json={"encoding_format": "float", **body}, timeout=60)
    assert response.status_code == 200, response.text
    return [d["embedding"] for d in response.json()["data"]]


def close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5


def test_sdk_embeddings_through_the_gateway_in_every_input_form(gateway, embedding_server, minilm):
    tenant = make_tenant("embed-sdk")
    client = client_for(gateway, tenant)
    expected = direct(embedding_server, {"model": EMBEDDING_MODEL, "input": SENTENCES})

    listed = client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES, encoding_format="float")
    assert [d.index for d in listed.data] == [0, 1, 2] and listed.model == EMBEDDING_MODEL
    assert all(close(d.embedding, e) for d, e in zip(listed.data, expected, strict=True))
    validate_response("/v1/embeddings", "post", 200, listed.model_dump())

    one = client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[0])  # base64, decoded by the SDK
    assert close(one.data[0].embedding, expected[0])

    tokens = [httpx.post(f"{embedding_server}/tokenize", json={"prompt": s}).json()["tokens"] for s in SENTENCES]
    as_tokens = client.embeddings.create(model=EMBEDDING_MODEL, input=tokens, encoding_format="float")
    one_list = client.embeddings.create(model=EMBEDDING_MODEL, input=tokens[1], encoding_format="float")
    assert all(close(d.embedding, e) for d, e in zip(as_tokens.data, expected, strict=True))
    assert close(one_list.data[0].embedding, expected[1])
    assert as_tokens.usage.prompt_tokens == as_tokens.usage.total_tokens == sum(map(len, tokens))

    short = client.embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES[:2], dimensions=32)
    assert [len(d.embedding) for d in short.data] == [32, 32]
    assert all(close(d.embedding, e) for d, e in zip(
        short.data, direct(embedding_server, {"model": EMBEDDING_MODEL, "input": SENTENCES[:2], "dimensions": 32}),
        strict=True))
    raw = post(gateway, tenant.raw_key, {"model": EMBEDDING_MODEL, "input": "x", "encoding_format": "base64"})
    vector = struct.unpack("<384f", base64.b64decode(raw.json()["data"][0]["embedding"]))
    assert close(list(vector), direct(embedding_server, {"model": EMBEDDING_MODEL, "input": "x"})[0])
    assert [m.id for m in client.models.list()] == [EMBEDDING_MODEL]
    assert client.models.retrieve(EMBEDDING_MODEL).model_extra["capabilities"] == {"embeddings": True}


def test_the_hold_is_a_bound_the_settlement_exact_and_one_usage_record_is_written(gateway, minilm):
    tenant = make_tenant("embed-quota")
    response = client_for(gateway, tenant).embeddings.create(model=EMBEDDING_MODEL, input=SENTENCES,
                                                             encoding_format="float")
    used = response.usage.prompt_tokens
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert (record.endpoint, record.status, record.http_status) == ("embeddings", UsageStatus.OK, 200)
    assert (record.prompt_tokens, record.completion_tokens, record.cached_tokens) == (used, 0, 0)
    assert record.model_name == EMBEDDING_MODEL and record.api_key_id == tenant.api_key.pk
    assert record.cost == (Decimal(used) * 2 / 1_000_000).quantize(Decimal("0.00000001"))
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (used, 0)
    assert not Reservation.objects.exists()


def test_a_quota_that_cannot_cover_the_input_is_refused_and_one_that_can_is_charged_exactly(gateway, minilm):
    # "hello world" is [CLS] hello world [SEP]: the hold counts those 4 tokens with the engine's tokenizer
    # (the byte bound, 11 + 2, applies only while the replica's tokenizer is unknown)
    refused = make_tenant("embed-poor", token_quota=3)
    response = post(gateway, refused.raw_key, {"model": EMBEDDING_MODEL, "input": "hello world"})
    assert response.status_code == 429 and response.json()["error"]["code"] == "insufficient_quota"
    exact = make_tenant("embed-exact", token_quota=4)
    response = post(gateway, exact.raw_key, {"model": EMBEDDING_MODEL, "input": "hello world"})
    assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 4
    entitlement = Entitlement.objects.get(pk=exact.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (4, 0)
    assert not UsageRecord.objects.filter(organization=refused.organization).exists()


def test_engine_refusals_are_relayed_and_charge_nothing(gateway, minilm):
    tenant = make_tenant("embed-refused")
    too_long = post(gateway, tenant.raw_key, {"model": EMBEDDING_MODEL, "input": ["ok", "word " * 300]})
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "input[1]"
    validate_error(too_long.json())
    record = UsageRecord.objects.get(organization=tenant.organization)
    assert record.status == UsageStatus.REJECTED_UPSTREAM and record.prompt_tokens == 0
    assert Entitlement.objects.get(pk=tenant.entitlement.pk).tokens_used == 0


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"input": ["a"] * 2049}, "input", "invalid_value"),
    ({"input": ""}, "input", "invalid_value"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    ({"input": "x", "cache_salt": "mine"}, "cache_salt", "unknown_parameter"),
    ({"input": "x", "dimensions": -1}, "dimensions", "invalid_value"),
])
def test_invalid_bodies_are_refused_by_the_gateway_before_any_hold(gateway, minilm, body, param, code):
    tenant = make_tenant("embed-invalid")
    response = post(gateway, tenant.raw_key, {"model": EMBEDDING_MODEL, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, code)
    assert not UsageRecord.objects.filter(organization=tenant.organization).exists()


def test_chat_on_an_embeddings_model_and_embeddings_on_a_chat_model_are_400s(gateway, embedding_server, minilm):
    add_model("chatty", embedding_server)  # a chat model: refused before anything is forwarded
    tenant = make_tenant("embed-kinds")
    for path, body in (("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("completions", {"prompt": "hi"})):
        response = post(gateway, tenant.raw_key, {"model": EMBEDDING_MODEL, **body}, path)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("model", "model_not_supported")
        assert "/v1/embeddings" in error["message"]
    response = post(gateway, tenant.raw_key, {"model": "chatty", "input": "hi"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "model_not_supported"
    assert "does not serve embeddings" in response.json()["error"]["message"]
    validate_error(response.json())
    assert not UsageRecord.objects.filter(organization=tenant.organization).exists()
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (0, 0)


def test_another_tenant_cannot_use_an_embeddings_model_it_has_no_access_to(gateway, minilm):
    owner = make_tenant("embed-owner")
    outsider = make_tenant("embed-outsider")
    narrow = make_tenant("embed-narrow", model_names=["some-other-model"])
    minilm.visibility = "listed"
    minilm.save()
    minilm.organizations.set([owner.organization, narrow.organization])
    assert post(gateway, owner.raw_key, {"model": EMBEDDING_MODEL, "input": "hi"}).status_code == 200
    for tenant in (outsider, narrow):  # not listed; listed but outside every entitlement
        response = post(gateway, tenant.raw_key, {"model": EMBEDDING_MODEL, "input": "hi"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
        assert not UsageRecord.objects.filter(organization=tenant.organization).exists()
    assert UsageRecord.objects.filter(organization=owner.organization).count() == 1
