"""Usage by key tells the playground apart from a deleted key, from the raw records and from the
daily roll-up alike."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from accounts.models import APIKey
from inference.models import DailyUsage, UsageRecord, UsageSource, UsageStatus
from inference.tasks import rollup_day
from inference.usage import Period, report

from .console_helpers import *  # noqa: F403  (fixtures)

pytestmark = pytest.mark.django_db

DAY = dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC)


def record(org, key, source, prompt, n=[0]):  # noqa: B006
    n[0] += 1
    row = UsageRecord.objects.create(
        organization=org, api_key=key, model_name="m", endpoint="chat/completions", prompt_tokens=prompt,
        completion_tokens=1, cost=Decimal("0.01"), status=UsageStatus.OK, http_status=200, latency_ms=5,
        request_id=f"req_usage_{n[0]}", source=source,
    )
    UsageRecord.objects.filter(pk=row.pk).update(created_at=DAY)


def by_key(org) -> list[tuple]:
    data = report(org, Period.parse("2026-11-20", "2026-11-20"), "key")["data"]
    return [(r["api_key"]["name"], r["api_key"]["source"], r["prompt_tokens"]) for r in data]


def test_playground_and_deleted_keys_are_separate_rows(org_a):
    key, _ = APIKey.objects.create_key(org_a, "alpha")
    gone, _ = APIKey.objects.create_key(org_a, "gone")
    record(org_a, key, UsageSource.API, 10)
    record(org_a, gone, UsageSource.API, 20)
    record(org_a, None, UsageSource.PLAYGROUND, 30)
    record(org_a, None, UsageSource.PLAYGROUND, 5)
    gone.delete()
    expected = [("alpha", "api", 10), ("(deleted key)", "api", 20), ("Playground", "playground", 35)]
    assert by_key(org_a) == expected

    rollup_day(DAY.date())  # a day long past: the report now reads the rolled-up rows
    DailyUsage.objects.filter(organization=org_a).update(updated_at=DAY + dt.timedelta(days=2))
    assert DailyUsage.objects.filter(organization=org_a, source=UsageSource.PLAYGROUND).get().prompt_tokens == 35
    UsageRecord.objects.filter(organization=org_a).delete()  # proves the rows come from the roll-up
    assert by_key(org_a) == expected
