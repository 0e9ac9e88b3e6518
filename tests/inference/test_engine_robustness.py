"""Through the gateway, against the real engine: bodies that used to kill the engine for every tenant are
400s naming their field, and the engine keeps serving; a non-streamed answer that takes longer than the
gateway's read timeout succeeds and is billed."""

from __future__ import annotations

import time

import httpx
import pytest

from inference.models import UsageRecord

from .conftest import add_model, make_tenant, start_gateway, stop

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def smollm2(engine_server):
    return add_model("smollm2", engine_server, context_length=2048)


def chat(gateway: str, key: str, **fields) -> httpx.Response:
    return httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {key}"}, timeout=120,
                      json={"model": "smollm2", "messages": MESSAGES, "max_tokens": 4, **fields})


@pytest.mark.parametrize(("fields", "param"), [
    ({"seed": 18446744073709551615, "n": 2, "temperature": 1}, "seed"),
    ({"top_k": 9223372036854775808, "temperature": 0.7}, "top_k"),
    ({"stop_token_ids": [10**9]}, "stop_token_ids"),
    ({"logit_bias": {"4000000": 5}}, "logit_bias"),
    ({"n": 128, "max_tokens": 1000}, "max_tokens"),
    ({"temperature": 1e308}, "temperature"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
     "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "frobnicate"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
])
def test_bodies_that_killed_the_engine_are_400s_and_other_tenants_go_on(gateway, smollm2, fields, param):
    attacker, bystander = make_tenant("attacker"), make_tenant("bystander")
    refused = chat(gateway, attacker.raw_key, **fields)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param
    served = chat(gateway, bystander.raw_key)
    assert served.status_code == 200 and served.json()["choices"][0]["message"]["content"]


def test_the_largest_seeds_sample_every_choice_and_reproduce(gateway, smollm2):
    tenant = make_tenant()
    first = chat(gateway, tenant.raw_key, seed=2**63 - 1, n=2, temperature=1, max_tokens=8, ignore_eos=True)
    again = chat(gateway, tenant.raw_key, seed=2**63 - 1, n=2, temperature=1, max_tokens=8, ignore_eos=True)
    assert first.status_code == again.status_code == 200
    texts = [c["message"]["content"] for c in first.json()["choices"]]
    assert len(texts) == 2 and texts == [c["message"]["content"] for c in again.json()["choices"]]
    low = chat(gateway, tenant.raw_key, seed=-(2**63), n=2, temperature=1, max_tokens=4)
    assert low.status_code == 200 and len(low.json()["choices"]) == 2


def test_a_non_streamed_answer_longer_than_the_read_timeout_succeeds_and_is_billed(django_db_setup, smollm2):
    """The engine sends its 200 and a space every 0.5 s (--keepalive-interval) while generating, so the
    gateway's read timeout (1.5 s here, between bytes) never fires on a long answer."""
    gateway, process = start_gateway(GATEWAY_UPSTREAM_READ_TIMEOUT="1.5")
    try:
        tenant = make_tenant()
        started = time.monotonic()
        response = chat(gateway, tenant.raw_key, max_tokens=120, ignore_eos=True)
        elapsed = time.monotonic() - started
        assert elapsed > 3, f"answered in {elapsed:.1f} s: too fast to show anything"
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["usage"]["completion_tokens"] == 120 and body["choices"][0]["finish_reason"] == "length"
        record = UsageRecord.objects.get(request_id=response.headers["x-request-id"])
        assert record.status == "ok" and record.completion_tokens == 120
        assert record.prompt_tokens == body["usage"]["prompt_tokens"]
    finally:
        stop(process)


def test_an_engine_failure_after_the_keepalive_200_reaches_the_client_as_an_error(gateway, engine_server):
    """The engine breaks (ENGINE_TEST_FAULT, its 30th step) after it has sent its 200 and some spaces: the
    gateway answers 502 with an OpenAI error, never a 200, and records the upstream error."""
    from engine.loader import demo_model_path

    from .conftest import start_engine

    process, url = start_engine(demo_model_path(), "--served-model-name", "fragile", "--threads", "1",
                                "--max-model-len", "1024", "--log-level", "warning", "--keepalive-interval",
                                "0.2", env={"ENGINE_TEST_FAULT": "fatal-after:30"})
    try:
        add_model("fragile", url, context_length=1024)
        tenant = make_tenant()
        response = httpx.post(f"{gateway}/v1/chat/completions", headers={"authorization": f"Bearer {tenant.raw_key}"},
                              timeout=120, json={"model": "fragile", "messages": MESSAGES, "max_tokens": 100,
                                                 "ignore_eos": True})
        assert response.status_code == 502, response.text
        assert response.json()["error"]["code"] == "upstream_error"
        record = UsageRecord.objects.get(request_id=response.headers["x-request-id"])
        assert record.status == "upstream_error" and record.http_status == 502
    finally:
        stop(process)
