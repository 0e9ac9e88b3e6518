"""The usage report (console dashboard, GET /api/usage) reads finished days from the DailyUsage roll-ups
and only the rest from raw usage records."""

import datetime as dt
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.models import APIKey, User
from accounts.tenancy import create_organization
from inference.models import DailyUsage, UsageRecord, UsageStatus
from inference.tasks import rollup_day
from inference.usage import Period, report

pytestmark = pytest.mark.django_db


def record(org, key, model, prompt, completion, when, n=[0]):  # noqa: B006
    n[0] += 1
    row = UsageRecord.objects.create(
        organization=org, api_key=key, model_name=model, endpoint="chat/completions", prompt_tokens=prompt,
        completion_tokens=completion, cost=Decimal("0.5"), status=UsageStatus.OK, http_status=200,
        latency_ms=5, request_id=f"req_rollup_{n[0]}",
    )
    UsageRecord.objects.filter(pk=row.pk).update(created_at=when)


@pytest.fixture
def org_and_key():
    user = User.objects.create_user("roll@example.com", "pw-123456789")
    org = create_organization(user, "Rolled Org")
    key, _ = APIKey.objects.create_key(org, "main", created_by=user)
    return org, key


def test_finished_days_come_from_rollups_even_after_raw_records_are_pruned(org_and_key):
    org, key = org_and_key
    now = timezone.now()
    past = (now - dt.timedelta(days=3)).replace(hour=12)
    record(org, key, "m", 10, 1, past)
    record(org, key, "m", 20, 2, past)
    record(org, key, "m", 5, 5, now)
    assert rollup_day(past.date()) == 1
    UsageRecord.objects.filter(created_at__date=past.date()).delete()  # retention: raw rows gone

    period = Period(now - dt.timedelta(days=7), now + dt.timedelta(seconds=1))
    by_model = report(org, period, "model")
    assert by_model["data"] == [{
        "model": "m", "requests": 3, "failed_requests": 0, "prompt_tokens": 35, "cached_tokens": 0,
        "completion_tokens": 8, "total_tokens": 43, "cost": "1.50000000",
    }]
    by_day = {row["day"]: row["requests"] for row in report(org, period, "day")["data"]}
    assert by_day == {past.date().isoformat(): 2, now.date().isoformat(): 1}
    by_key = report(org, period, "key")["data"]
    assert [(r["api_key"]["name"], r["requests"]) for r in by_key] == [("main", 3)]


def test_a_rollup_built_before_the_day_ended_is_not_trusted(org_and_key):
    org, key = org_and_key
    now = timezone.now()
    past = (now - dt.timedelta(days=2)).replace(hour=10)
    record(org, key, "m", 10, 1, past)
    rollup_day(past.date())
    DailyUsage.objects.filter(day=past.date()).update(updated_at=past.replace(hour=11))  # a partial-day build
    record(org, key, "m", 10, 1, past.replace(hour=15))  # arrived after that build
    period = Period(now - dt.timedelta(days=7), now)
    assert report(org, period, "model")["totals"]["requests"] == 2  # raw records, not the stale rollup
