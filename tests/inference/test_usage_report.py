"""GET /api/usage and the console usage page: org-scoped sums by model, key and day."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from accounts.models import APIKey, User
from accounts.tenancy import create_organization
from inference.models import UsageRecord, UsageStatus

pytestmark = pytest.mark.django_db


def record(org, key, model, prompt, completion, when, status=UsageStatus.OK, n=[0]):  # noqa: B006
    n[0] += 1
    row = UsageRecord.objects.create(
        organization=org, api_key=key, model_name=model, endpoint="chat/completions", prompt_tokens=prompt,
        completion_tokens=completion, cost=Decimal("0.001") * (prompt + completion), status=status,
        http_status=200, latency_ms=5, request_id=f"req_{n[0]}_{org.pk}",
    )
    UsageRecord.objects.filter(pk=row.pk).update(created_at=when)


@pytest.fixture
def setup():
    user = User.objects.create_user("owner@example.com", "pw-123456789")
    org = create_organization(user, "Usage Org")
    other = create_organization(User.objects.create_user("x@example.com", "pw-123456789"), "Other Org")
    key_a, _ = APIKey.objects.create_key(org, "alpha", created_by=user)
    key_b, _ = APIKey.objects.create_key(org, "beta", created_by=user)
    day1 = dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC)
    day2 = dt.datetime(2026, 11, 21, 23, 59, tzinfo=dt.UTC)
    record(org, key_a, "smollm2", 10, 5, day1)
    record(org, key_a, "smollm2", 20, 5, day2)
    record(org, key_b, "other-model", 100, 0, day2, status=UsageStatus.UPSTREAM_ERROR)
    record(other, None, "smollm2", 999, 999, day2)
    return user, org, key_a, key_b


def login(client, user, org):
    client.force_login(user)
    session = client.session
    session["organization_id"] = org.pk
    session.save()


def test_group_by_model_key_and_day(client, setup):
    user, org, key_a, key_b = setup
    login(client, user, org)
    params = {"start": "2026-11-20", "end": "2026-11-21"}
    by_model = client.get("/api/usage", {**params, "group_by": "model"}).json()
    assert [(r["model"], r["requests"], r["total_tokens"]) for r in by_model["data"]] == [
        ("other-model", 1, 100), ("smollm2", 2, 40)]
    assert by_model["totals"]["total_tokens"] == 140 and by_model["totals"]["failed_requests"] == 1
    assert Decimal(by_model["totals"]["cost"]) == Decimal("0.140")
    by_key = client.get("/api/usage", {**params, "group_by": "key"}).json()
    assert [(r["api_key"]["name"], r["prompt_tokens"]) for r in by_key["data"]] == [("alpha", 30), ("beta", 100)]
    assert by_key["data"][0]["api_key"]["id"] == f"sk-{key_a.public_id}"
    by_day = client.get("/api/usage", {**params, "group_by": "day"}).json()
    assert [(r["day"], r["total_tokens"]) for r in by_day["data"]] == [("2026-11-20", 15), ("2026-11-21", 125)]
    only_first_day = client.get("/api/usage", {"start": "2026-11-20", "end": "2026-11-20", "group_by": "day"}).json()
    assert [r["day"] for r in only_first_day["data"]] == ["2026-11-20"]


@pytest.mark.parametrize(("query", "param"), [
    ({"group_by": "week"}, "group_by"),
    ({"start": "yesterday"}, "start"),
    ({"start": "2026-11-22", "end": "2026-11-20"}, "start"),
])
def test_bad_parameters_are_400(client, setup, query, param):
    user, org, *_ = setup
    login(client, user, org)
    response = client.get("/api/usage", query)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_requires_a_session(client, setup):
    assert client.get("/api/usage").status_code == 403


def test_usage_page_has_charts_tables_and_nav_link(client, setup):
    user, org, *_ = setup
    login(client, user, org)
    response = client.get("/usage/", {"start": "2026-11-19", "end": "2026-11-22"})
    html = response.content.decode()
    assert response.status_code == 200
    charts = response.context["charts"]  # drawn by static/js/usage-charts.js (Chart.js)
    assert charts["by_day"]["days"] == ["2026-11-19", "2026-11-20", "2026-11-21", "2026-11-22"]
    assert sorted(charts["by_day"]["models"]) == ["other-model", "smollm2"]  # two models
    assert 'id="usage-charts" type="application/json"' in html and "vendor/chartjs/chart.umd.min.js" in html
    assert "alpha" in html and "beta" in html and "other-model" in html
    assert 'href="/usage/" aria-current="page">Usage</a>' in html
    assert "999" not in html  # the other organization's usage


def test_usage_page_reports_bad_dates(client, setup):
    user, org, *_ = setup
    login(client, user, org)
    response = client.get("/usage/", {"start": "nope"})
    assert response.status_code == 200 and "must be an ISO date" in response.content.decode()
