"""The request log (the organization's own usage records, filtered and paginated) and the usage CSV
export, which has the rows of GET /api/usage for the same parameters."""

from __future__ import annotations

import csv
import datetime as dt
import io
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.models import APIKey
from inference.models import UsageRecord, UsageSource, UsageStatus

from .console_helpers import *  # noqa: F403  (fixtures)

pytestmark = pytest.mark.django_db

NOW = timezone.now()


def record(org, key, model="alpha", status=UsageStatus.OK, source=UsageSource.API, when=None, prompt=10, n=[0]):  # noqa: B006
    n[0] += 1
    row = UsageRecord.objects.create(
        organization=org, api_key=key, model_name=model, endpoint="chat/completions", prompt_tokens=prompt,
        cached_tokens=2, completion_tokens=5, cost=Decimal("0.00012345"), status=status,
        http_status=200 if status == UsageStatus.OK else 502, latency_ms=123.4, time_to_first_token_ms=45.6,
        request_id=f"req_log_{n[0]:04d}", source=source,
    )
    UsageRecord.objects.filter(pk=row.pk).update(created_at=when or NOW - dt.timedelta(minutes=n[0]))
    return row


@pytest.fixture
def log(org_a, org_b):
    alpha_key, _ = APIKey.objects.create_key(org_a, "alpha key")
    beta_key, _ = APIKey.objects.create_key(org_a, "beta key")
    b_key, _ = APIKey.objects.create_key(org_b, "b's key")
    rows = {
        "ok": record(org_a, alpha_key),
        "failed": record(org_a, beta_key, model="beta", status=UsageStatus.UPSTREAM_ERROR),
        "playground": record(org_a, None, source=UsageSource.PLAYGROUND),
        "old": record(org_a, alpha_key, when=NOW - dt.timedelta(days=40)),
        "other_org": record(org_b, b_key),
    }
    return rows, alpha_key, b_key


def shown(client, **params) -> list[str]:
    response = client.get("/requests/", params)
    assert response.status_code == 200, response.content
    return [r.request_id for r in response.context["page"].object_list]


def test_lists_the_organizations_requests_with_their_numbers(client_a, log):
    rows, alpha_key, _ = log
    page = client_a.get("/requests/").content.decode()
    assert shown(client_a) == [rows["ok"].request_id, rows["failed"].request_id, rows["playground"].request_id]
    assert rows["other_org"].request_id not in page and rows["old"].request_id not in page  # last 30 days by default
    assert "alpha key" in page and alpha_key.redacted in page and "Playground" in page
    assert "10 (2 cached) / 5" in page and "0.00012345" in page and "123 ms" in page and "first token 46 ms" in page
    assert "Upstream error" in page and "502" in page


def test_filters(client_a, log):
    rows, alpha_key, _ = log
    assert shown(client_a, key=alpha_key.public_id) == [rows["ok"].request_id]
    assert shown(client_a, key="playground") == [rows["playground"].request_id]
    assert shown(client_a, model="beta") == [rows["failed"].request_id]
    assert shown(client_a, outcome="failed") == [rows["failed"].request_id]
    assert shown(client_a, outcome="ok", model="alpha") == [rows["ok"].request_id, rows["playground"].request_id]
    assert shown(client_a, request_id=rows["playground"].request_id) == [rows["playground"].request_id]
    old_day = (NOW - dt.timedelta(days=40)).date().isoformat()
    assert shown(client_a, start=old_day, end=old_day) == [rows["old"].request_id]


def test_bad_filters_are_form_errors_and_other_organizations_keys_are_not_choices(client_a, log):
    _, _, b_key = log
    response = client_a.get("/requests/", {"key": b_key.public_id})
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert not response.context["page"].object_list
    backwards = client_a.get("/requests/", {"start": "2026-11-20", "end": "2026-11-01"})
    assert backwards.status_code == 400 and "must be before" in backwards.content.decode()
    assert "b&#x27;s key" not in client_a.get("/requests/").content.decode()


def test_paginates_fifty_a_page_keeping_the_filters(client_a, org_a):
    key, _ = APIKey.objects.create_key(org_a, "busy key")
    made = [record(org_a, key, model="busy") for _ in range(55)]
    first = client_a.get("/requests/", {"model": "busy"})
    assert len(first.context["page"].object_list) == 50
    assert 'href="?model=busy&amp;page=2"' in first.content.decode()
    second = shown(client_a, model="busy", page=2)
    assert second == [r.request_id for r in made[50:]]


@pytest.mark.parametrize("group_by", ["day", "model", "key"])
def test_csv_export_matches_the_usage_api(client_a, log, group_by):
    start, end = (NOW - dt.timedelta(days=45)).date().isoformat(), NOW.date().isoformat()
    api = client_a.get("/api/usage", {"start": start, "end": end, "group_by": group_by}).json()
    response = client_a.get("/usage/export.csv", {"start": start, "end": end, "group_by": group_by})
    assert response.status_code == 200 and response["content-type"].startswith("text/csv")
    assert f"by-{group_by}.csv" in response["content-disposition"]
    lines = list(csv.DictReader(io.StringIO(response.content.decode())))
    total, rows = lines[-1], lines[:-1]
    assert len(rows) == len(api["data"]) and len(api["data"]) >= 2
    for line, expected in zip(rows, api["data"], strict=True):
        if group_by == "key":
            assert (line["api_key_id"] or None, line["api_key_name"], line["source"]) == (
                expected["api_key"]["id"], expected["api_key"]["name"], expected["api_key"]["source"])
        else:
            assert line[group_by] == expected[group_by]
        for column in ("requests", "failed_requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                       "total_tokens"):
            assert int(line[column]) == expected[column]
        assert Decimal(line["cost"]) == Decimal(expected["cost"])
    assert int(total["total_tokens"]) == api["totals"]["total_tokens"] == 4 * 15
    assert Decimal(total["cost"]) == Decimal(api["totals"]["cost"])


def test_csv_export_refuses_a_bad_period(client_a):
    response = client_a.get("/usage/export.csv", {"start": "yesterday"})
    assert response.status_code == 400 and "start" in response.content.decode()
    assert client_a.get("/usage/export.csv", {"group_by": "week"}).status_code == 400
