"""The playground's endpoint: the browser session (and its CSRF token) as a second kind of credential on
the gateway's one path. Through a real gateway process and a real upstream process: the answer streams,
the quota is held and settled, the usage record is marked as from the playground, and the entitlement,
rate-limit and CSRF rules refuse as they do for a key."""

from __future__ import annotations

import json

import httpx
import pytest
from django.test import Client

from accounts.codes import issue_codes, redeem
from accounts.models import APIKey, Entitlement
from inference.catalog import catalog
from inference.models import AIModel, Deployment, Reservation, UsageRecord, UsageSource
from tests.inference.conftest import stub_upstream  # noqa: F401  (fixture)
from tests.processes import stop

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import make_org, make_user, start_console_gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PLAYGROUND = "/playground/v1/chat/completions"
CSRF = "a" * 32  # a CSRF secret: the cookie holds it, the header repeats it
BODY = {"model": "stub-model", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 5,
        "stream": True, "stream_options": {"include_usage": True}}

NOT_STREAMED = {k: v for k, v in BODY.items() if k not in ("stream", "stream_options")}


@pytest.fixture(scope="module")
def gateway_url(django_db_setup):
    url, process = start_console_gateway()
    yield url
    stop(process)


@pytest.fixture
def member(stub_upstream):  # noqa: F811
    """A member of an organization with a 10,000-token entitlement and a session cookie."""
    model = AIModel.objects.create(name="stub-model")
    Deployment.objects.create(model=model, base_url=stub_upstream)
    catalog.invalidate()
    user = make_user("player@example.com")
    org = make_org(user, "player-org")
    entitlement = redeem(org, issue_codes(1, token_quota=10_000)[0].raw, user)
    client = Client()
    client.force_login(user)
    return user, org, entitlement, client.cookies["sessionid"].value


def session_headers(sessionid: str, csrf: str | None = CSRF) -> dict:
    cookie = f"sessionid={sessionid}" + (f"; csrftoken={CSRF}" if csrf else "")
    headers = {"Cookie": cookie, "Content-Type": "application/json"}
    if csrf:
        headers["X-CSRFToken"] = csrf
    return headers


def sse_events(response: httpx.Response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_playground_streams_holds_and_settles_and_records_the_session_user(gateway_url, member):
    user, org, entitlement, sessionid = member
    with httpx.stream("POST", f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid), json=BODY) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        request_id = response.headers["x-request-id"]
        events = sse_events(response)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c["choices"])
    usage = events[-1]["usage"]
    assert text and usage["completion_tokens"] == 5

    record = UsageRecord.objects.get(request_id=request_id)
    assert record.source == UsageSource.PLAYGROUND
    assert record.organization == org and record.user == user and record.api_key is None
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert record.stream and record.status == "ok" and record.time_to_first_token_ms is not None
    entitlement.refresh_from_db()
    assert entitlement.tokens_used == usage["total_tokens"] and entitlement.tokens_reserved == 0
    assert not Reservation.objects.filter(entitlement=entitlement).exists()


def test_playground_refuses_without_csrf_token(gateway_url, member):
    _, _, entitlement, sessionid = member
    response = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid, csrf=None), json=BODY)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "csrf_failed"
    wrong = {**session_headers(sessionid), "X-CSRFToken": "b" * 32}
    assert httpx.post(f"{gateway_url}{PLAYGROUND}", headers=wrong, json=BODY).status_code == 403
    assert not UsageRecord.objects.exists()


def test_playground_refuses_without_a_session_and_ignores_api_keys(gateway_url, member):
    _, org, _, _ = member
    _, raw_key = APIKey.objects.create_key(org, "not for the playground")
    response = httpx.post(f"{gateway_url}{PLAYGROUND}", headers={"Authorization": f"Bearer {raw_key}",
                                                                 "X-CSRFToken": CSRF, "Cookie": f"csrftoken={CSRF}"},
                          json=BODY)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_session"
    forged = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers("not-a-session"), json=BODY)
    assert forged.status_code == 401


def test_playground_answers_openai_errors_for_bad_bodies_and_unknown_models(gateway_url, member):
    _, _, _, sessionid = member
    bad = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid),
                     json={**BODY, "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "temperature"
    unknown = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid),
                         json={**BODY, "model": "no-such-model"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert not UsageRecord.objects.exists()


def test_playground_is_held_to_the_organizations_quota(gateway_url, member):
    _, _, entitlement, sessionid = member
    Entitlement.objects.filter(pk=entitlement.pk).update(token_quota=10)
    over = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid), json=BODY)
    assert over.status_code == 429 and over.json()["error"]["type"] == "insufficient_quota"
    assert not UsageRecord.objects.exists()


def test_playground_is_held_to_the_organizations_rate_limit(gateway_url, member):
    _, org, _, sessionid = member
    org.requests_per_minute = 1
    org.save(update_fields=["requests_per_minute"])
    first = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid), json=NOT_STREAMED)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    second = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid), json=NOT_STREAMED)
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"


def test_playground_requires_an_entitlement_and_a_membership(gateway_url, member):
    user, org, entitlement, sessionid = member
    entitlement.revoked_at = entitlement.created_at
    entitlement.save(update_fields=["revoked_at"])
    refused = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(sessionid), json=BODY)
    assert refused.status_code == 403

    outsider = make_user("outsider@example.com")
    client = Client()
    client.force_login(outsider)
    no_org = httpx.post(f"{gateway_url}{PLAYGROUND}", headers=session_headers(client.cookies["sessionid"].value),
                        json=BODY)
    assert no_org.status_code == 403 and no_org.json()["error"]["code"] == "no_organization"


def test_playground_page_offers_the_organizations_models_and_holds_no_key(client_a, org_a):
    AIModel.objects.create(name="first-model", display_name="First")
    AIModel.objects.create(name="second-model", display_name="Second")
    AIModel.objects.create(name="not-covered")
    AIModel.objects.create(name="an-embedder", kind="embeddings")  # covered, but not a chat model
    redeem(org_a, issue_codes(1, model_names=["first-model", "second-model", "an-embedder"])[0].raw,
           org_a.memberships.first().user)
    APIKey.objects.create_key(org_a, "existing key")
    catalog.invalidate()
    response = client_a.get("/playground/?model=second-model")
    html = response.content.decode()
    assert response.status_code == 200 and "csrftoken" in response.cookies
    assert '<option value="second-model" selected>' in html and '<option value="first-model" >' in html
    assert "not-covered" not in html and "an-embedder" not in html
    assert f'data-endpoint="{PLAYGROUND}"' in html and "js/playground.js" in html
    assert "sk-" not in html and "<script>" not in html  # no key, no inline script (CSP)
    assert 'data-base-url="http://testserver/v1"' in html


def test_playground_page_without_models_calls_to_redeem(client_a):
    html = client_a.get("/playground/").content.decode()
    assert "No models yet" in html and "playground.js" not in html
