"""The gateway's own bodies (its errors, its model list) and the engine bodies it relays validate against
OpenAI's published OpenAPI document, through a real uvicorn gateway process."""

from __future__ import annotations

import httpx
import pytest

from tests.openapi_spec import validate_response, validate_stream
from tests.processes import free_port

from .conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
MESSAGES = [{"role": "user", "content": "Name two colors."}]


@pytest.fixture
def tenant(stub_upstream):
    add_model("stub-model", stub_upstream)
    return make_tenant()


def bearer(raw_key: str) -> dict:
    return {"Authorization": f"Bearer {raw_key}"}


def test_models_list_and_retrieve_validate(gateway, tenant):
    listed = httpx.get(f"{gateway}{MODELS}", headers=bearer(tenant.raw_key))
    assert listed.status_code == 200
    validate_response(MODELS, "get", 200, listed.json())
    assert [m["id"] for m in listed.json()["data"]] == ["stub-model"]
    one = httpx.get(f"{gateway}{MODELS}/stub-model", headers=bearer(tenant.raw_key))
    assert one.status_code == 200
    validate_response(f"{MODELS}/stub-model", "get", 200, one.json())
    # documented extras beyond the spec's fields: the catalog's context length, capabilities, tool format
    assert one.json()["max_model_len"] == 2048 and one.json()["tool_format"] == "auto"
    assert one.json()["capabilities"] == {"tools": True, "json_schema": True, "json_object": True}
    assert listed.json()["data"] == [one.json()]


def unknown_key(raw: str) -> str:
    """The tenant's key with its secret changed: well formed, so it is looked up, and refused."""
    return raw[:-4] + ("aaaa" if not raw.endswith("aaaa") else "bbbb")


CHAT_BODY = {"model": "stub-model", "messages": MESSAGES, "max_tokens": 2}
ERROR_CASES = {
    # id: (method, path, key (None: no header; a function of the tenant's key), body, status)
    "no_key_models": ("GET", MODELS, None, None, 401),
    "no_key_chat": ("POST", CHAT, None, CHAT_BODY, 401),
    "malformed_key": ("POST", CHAT, lambda raw: "sk-not-a-key", CHAT_BODY, 401),
    "unknown_key": ("GET", MODELS, unknown_key, None, 401),
    "unknown_url": ("GET", "/v1/no-such-endpoint", lambda raw: raw, None, 404),
    "unknown_url_no_key": ("POST", "/v1/audio/speech", None, {"input": "x"}, 404),
    "unknown_model": ("GET", f"{MODELS}/no-such-model", lambda raw: raw, None, 404),
    "unknown_model_chat": ("POST", CHAT, lambda raw: raw, {**CHAT_BODY, "model": "no-such-model"}, 404),
    "get_chat": ("GET", CHAT, lambda raw: raw, None, 405),
    "post_models": ("POST", MODELS, lambda raw: raw, {}, 405),
    "invalid_json": ("POST", CHAT, lambda raw: raw, b"{not json", 400),
    "bad_param": ("POST", CHAT, lambda raw: raw, {**CHAT_BODY, "temperature": "hot"}, 400),
    "completion_bad_param": ("POST", COMPLETIONS, lambda raw: raw,
                             {"model": "stub-model", "prompt": "x", "max_tokens": -1}, 400),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_gateway_errors_validate(gateway, tenant, case):
    method, path, key, body, status = case
    headers = bearer(key(tenant.raw_key)) if key else {}
    content = body if isinstance(body, bytes) else None
    response = httpx.request(method, f"{gateway}{path}", headers=headers, content=content,
                             json=None if content is not None or body is None else body, timeout=30)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    validate_response(path, method, status, response.json())


def test_quota_refusal_validates_as_the_documented_429(gateway, stub_upstream):
    add_model("stub-model", stub_upstream)
    poor = make_tenant("poor", token_quota=1)
    response = httpx.post(f"{gateway}{CHAT}", headers=bearer(poor.raw_key), json={**CHAT_BODY, "max_tokens": 50})
    assert response.status_code == 429
    validate_response(CHAT, "post", 429, response.json())  # the spec documents 429 on this operation


def test_engine_down_validates(gateway, stub_upstream):
    add_model("down-model", f"http://127.0.0.1:{free_port()}")
    tenant = make_tenant()
    response = httpx.post(f"{gateway}{CHAT}", headers=bearer(tenant.raw_key), json={**CHAT_BODY, "model": "down-model"})
    assert response.status_code == 503
    validate_response(CHAT, "post", 503, response.json())


def test_relayed_engine_bodies_validate(gateway, engine_server):
    """Chat and completions, whole and streamed, from the real engine through the gateway."""
    add_model("smollm2", engine_server, context_length=2048)
    headers = bearer(make_tenant().raw_key)
    with httpx.Client(base_url=gateway, headers=headers, timeout=120) as client:
        chat = {"model": "smollm2", "messages": MESSAGES, "max_tokens": 4}
        legacy = {"model": "smollm2", "prompt": "The capital of France is", "max_tokens": 4}
        for path, body in [(CHAT, {**chat, "logprobs": True, "top_logprobs": 2}),
                           (COMPLETIONS, {**legacy, "echo": True, "logprobs": 1})]:
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            validate_response(path, "post", 200, response.json())
        for path, body in [(CHAT, {**chat, "stream": True}),
                           (CHAT, {**chat, "stream": True, "stream_options": {"include_usage": True}}),
                           (COMPLETIONS, {**legacy, "stream": True}),
                           (COMPLETIONS, {**legacy, "stream": True, "stream_options": {"include_usage": True}})]:
            response = client.post(path, json=body)
            assert response.status_code == 200, response.text
            chunks = validate_stream(path, "post", response.text)
            assert bool(chunks[-1].get("usage")) == ("stream_options" in body)
