"""The operator overview: staff only; platform-wide requests, errors, tokens and top organizations per day,
every replica's health, and the quota refusals a real gateway process counted."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal

import httpx
import pytest
from django.test import Client
from django.utils import timezone

from accounts.codes import issue_codes, redeem
from accounts.middleware import MFA_SETUP_SESSION_KEY
from accounts.models import APIKey, User
from inference.models import AIModel, Deployment, UsageRecord, UsageStatus
from inference.overview import platform_days
from tests.inference.conftest import stub_upstream  # noqa: F401  (fixture)
from tests.processes import stop

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import make_org, make_user, start_console_gateway

NOW = timezone.now()


def record(org, tokens, when, status=UsageStatus.OK, n=[0]):  # noqa: B006
    n[0] += 1
    row = UsageRecord.objects.create(
        organization=org, model_name="m", endpoint="chat/completions", prompt_tokens=tokens, completion_tokens=0,
        cost=Decimal("0.001"), status=status, http_status=200, latency_ms=1, request_id=f"req_op_{n[0]}")
    UsageRecord.objects.filter(pk=row.pk).update(created_at=when)


def staff_client() -> Client:
    client = Client()
    client.force_login(User.objects.create_user("ops@example.com", "pw-not-used-123", is_staff=True))
    session = client.session
    session.pop(MFA_SETUP_SESSION_KEY, None)  # set up TOTP is another test's subject
    session.save()
    return client


@pytest.mark.django_db
def test_only_staff_see_it(client_a):
    assert client_a.get("/operator/").status_code == 404
    assert "Operator" not in client_a.get("/").content.decode()
    assert Client().get("/operator/").status_code == 302


@pytest.mark.django_db
def test_days_top_organizations_and_replicas(org_a, org_b):
    yesterday = NOW - dt.timedelta(days=1)
    record(org_a, 100, yesterday)
    record(org_a, 50, yesterday, status=UsageStatus.UPSTREAM_ERROR)
    record(org_b, 500, yesterday)
    record(org_b, 7, NOW - dt.timedelta(days=30))  # outside the 14 days
    model = AIModel.objects.create(name="served")
    Deployment.objects.create(model=model, base_url="http://127.0.0.1:9", healthy=False, last_error="ConnectError")
    Deployment.objects.create(model=model, base_url="http://127.0.0.1:10")

    days = platform_days(now=NOW)
    assert len(days) == 14 and days[0]["day"] == NOW.date()
    day = next(d for d in days if d["day"] == yesterday.date())
    assert (day["requests"], day["failed"], day["tokens"]) == (3, 1, 650)
    assert [o["slug"] for o in day["top"]] == ["org-b", "org-a"]
    assert sum(d["tokens"] for d in days) == 650

    page = staff_client().get("/operator/").content.decode()
    assert re.search(rf'data-day="{yesterday.date()}".*?class="tokens">650<', page, re.S)
    assert "ConnectError" in page and "unhealthy" in page and "status-degraded" in page


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_quota_refusals_counted_by_the_gateway(django_db_setup, stub_upstream):  # noqa: F811
    url, process = start_console_gateway()
    try:
        Deployment.objects.create(model=AIModel.objects.create(name="stub-model"), base_url=stub_upstream)
        owner = make_user("thrifty@example.com")
        org = make_org(owner, "thrifty")
        redeem(org, issue_codes(1, token_quota=5)[0].raw, owner)
        _, raw_key = APIKey.objects.create_key(org, "k")
        body = {"model": "stub-model", "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):
            refused = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {raw_key}"})
            assert refused.status_code == 429 and refused.json()["error"]["code"] == "insufficient_quota"
        session = staff_client().cookies["sessionid"].value
        page = httpx.get(f"{url}/operator/", cookies={"sessionid": session}).text
        assert re.search(r"<td[^>]*>thrifty</td><td[^>]*><code>insufficient_quota</code></td>"
                         r"<td[^>]*class=\"refused\">2</td>", page), page[-3000:]
    finally:
        stop(process)
