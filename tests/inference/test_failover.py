"""Fallback models and external upstreams, through real processes: the gateway under uvicorn, the stub
upstream (its purpose-built faults: a 500, a 429, a stall before any byte, a stream cut midway, an answer
without usage) serving as several deployments, an unreachable port, and the real engine on SmolLM2.

Failover happens only before the first byte; the usage record names the deployment and the model that
answered, billed at that model's prices with the answering server's usage (or, when it reports none, the
model's tokenizer)."""

from __future__ import annotations

from decimal import Decimal

import httpx
import openai
import pytest

from accounts.models import Entitlement
from inference.models import AIModel, Deployment, DeploymentKind, ModelFallback, UsageRecord, UsageStatus

from .conftest import free_port, make_tenant, start_gateway, stop

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def gateway(django_db_setup, redis_clean):
    """Fails over when an upstream has sent no response headers after 1.5 s."""
    url, process = start_gateway(GATEWAY_FIRST_BYTE_TIMEOUT="1.5")
    yield url
    stop(process)


def model(name: str, price: str, *deployments: dict) -> AIModel:
    created = AIModel.objects.create(name=name, price_input_per_million=Decimal(price),
                                     price_output_per_million=Decimal(price) * 2)
    for fields in deployments:
        Deployment.objects.create(model=created, **fields)
    return created


def fallbacks(primary: AIModel, *others: AIModel) -> None:
    for position, other in enumerate(others):
        ModelFallback.objects.create(model=primary, fallback=other, position=position)


def seen_by(stub: str, request_id: str) -> list[dict]:
    return [r for r in httpx.get(f"{stub}/_requests").json()["received"] if r["headers"].get("x-request-id") == request_id]


def engine_prefix_lookups(engine: str) -> int:
    return httpx.get(f"{engine}/load").json()["prefix_cache_queries"]


def usage_row(request_id: str) -> UsageRecord:
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = UsageRecord.objects.filter(request_id=request_id).first()
        if row is not None:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no usage row for {request_id}")


def test_every_failure_before_the_first_byte_falls_over_to_the_next_model_billed_at_its_prices(
        gateway, stub_upstream, engine_server):
    alpha = model("alpha", "1",
                  {"base_url": stub_upstream, "served_model_name": "mode:error500"},
                  {"base_url": stub_upstream, "served_model_name": "mode:error429"},
                  {"base_url": f"http://127.0.0.1:{free_port()}"})  # connect refused
    beta = model("beta", "2", {"base_url": stub_upstream, "served_model_name": "mode:stall"})  # no byte in time
    gamma = model("gamma", "5", {"base_url": engine_server, "served_model_name": "smollm2"})
    fallbacks(alpha, beta, gamma)
    tenant = make_tenant()
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", timeout=60,
                      headers={"authorization": f"Bearer {tenant.raw_key}"},
                      json={"model": "alpha", "messages": MESSAGES, "max_tokens": 4, "stream": True,
                            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    reported = httpx.Response(200, content=lines[-2][5:]).json()["usage"]
    # every replica of alpha and beta was tried once, in some order, before gamma answered
    assert sorted(r["body"]["model"] for r in seen_by(stub_upstream, request_id)) == [
        "mode:error429", "mode:error500", "mode:stall"]
    row = usage_row(request_id)
    answered = Deployment.objects.get(model=gamma)
    assert (row.deployment_id, row.model_id, row.model_name, row.status) == (answered.pk, gamma.pk, "gamma", "ok")
    assert (row.prompt_tokens, row.completion_tokens) == (reported["prompt_tokens"], reported["completion_tokens"])
    assert row.cost == gamma.cost(row.prompt_tokens, row.cached_tokens, row.completion_tokens) > 0
    assert row.cost != alpha.cost(row.prompt_tokens, row.cached_tokens, row.completion_tokens)
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (row.prompt_tokens + row.completion_tokens, 0)


def test_a_stream_cut_after_its_first_byte_is_never_retried(gateway, stub_upstream, engine_server):
    cut = model("cut-midway", "1", {"base_url": stub_upstream, "served_model_name": "mode:close_midway"})
    fallbacks(cut, model("cut-backup", "3", {"base_url": engine_server, "served_model_name": "smollm2"}))
    tenant = make_tenant()
    lookups = engine_prefix_lookups(engine_server)
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)
    stream = client.chat.completions.with_raw_response.create(model="cut-midway", messages=MESSAGES, max_tokens=8,
                                                              stream=True)
    request_id = stream.headers["x-request-id"]
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream.parse():
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "".join(filter(None, received)) == "Hello from the"
    assert len(seen_by(stub_upstream, request_id)) == 1  # not again on the same replica...
    assert engine_prefix_lookups(engine_server) == lookups  # ...nor on the fallback
    row = usage_row(request_id)
    assert (row.model_name, row.status, row.completion_tokens) == ("cut-midway", UsageStatus.UPSTREAM_ERROR, 3)


def test_an_external_upstream_gets_no_engine_extensions_its_key_and_is_metered_with_the_models_tokenizer(
        gateway, stub_upstream, engine_server):
    external = model("external", "1", {"base_url": stub_upstream, "served_model_name": "mode:nousage",
                                       "kind": DeploymentKind.OPENAI, "supports_cache_salt": False,
                                       "supports_tokenize": False, "supports_tokenizer": False})
    # Our engine serving the same model, drained: no request goes there, its tokenizer meters the external one.
    Deployment.objects.create(model=external, base_url=engine_server, served_model_name="smollm2", draining=True)
    deployment = Deployment.objects.get(model=external, kind=DeploymentKind.OPENAI)
    deployment.api_key = "sk-provider-secret-4411"
    deployment.save()
    tenant = make_tenant()
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="external", messages=MESSAGES, max_tokens=5)
    answer = raw.parse()
    [sent] = seen_by(stub_upstream, raw.headers["x-request-id"])
    assert sent["headers"]["authorization"] == "Bearer sk-provider-secret-4411"
    assert "cache_salt" not in sent["body"] and "tool_format" not in sent["body"]
    row = usage_row(raw.headers["x-request-id"])
    assert row.deployment_id == deployment.pk
    count = lambda body: httpx.post(f"{engine_server}/tokenize", json=body).json()["count"]  # noqa: E731
    text = answer.choices[0].message.content
    assert row.prompt_tokens == count({"messages": MESSAGES})
    assert row.completion_tokens == count({"prompt": text}) - count({"prompt": ""}) > 1
