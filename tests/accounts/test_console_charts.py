"""The usage charts' series: per day and model they add up to the usage report (raw records and rolled-up
days alike), timings are PostgreSQL's percentile_cont (and the SQLite fallback computes the same), and a
period without usage shows an empty state instead of charts."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from django.db.models.functions import TruncDate

from accounts.models import APIKey
from inference.charts import (
    _percentile_cont,
    _python_percentiles,
    per_day_and_model,
    timing_percentiles,
    usage_charts,
)
from inference.models import DailyUsage, UsageRecord, UsageStatus
from inference.tasks import rollup_day
from inference.usage import Period, report

from .console_helpers import *  # noqa: F403  (fixtures)

pytestmark = pytest.mark.django_db

DAY1 = dt.datetime(2026, 11, 20, 9, tzinfo=dt.UTC)
DAY3 = dt.datetime(2026, 11, 22, 9, tzinfo=dt.UTC)
PERIOD = ("2026-11-19", "2026-11-22")


def record(org, key, model, tokens, when, latency, ttft=None, status=UsageStatus.OK, n=[0]):  # noqa: B006
    n[0] += 1
    row = UsageRecord.objects.create(
        organization=org, api_key=key, model_name=model, endpoint="chat/completions", prompt_tokens=tokens,
        completion_tokens=1, cost=Decimal("0.0001") * tokens, status=status, http_status=200, latency_ms=latency,
        time_to_first_token_ms=ttft, request_id=f"req_chart_{n[0]}",
    )
    UsageRecord.objects.filter(pk=row.pk).update(created_at=when)


@pytest.fixture
def usage(org_a, org_b):
    key, _ = APIKey.objects.create_key(org_a, "chart key")
    for latency in (100, 200, 300, 400):
        record(org_a, key, "alpha", 10, DAY1, latency, ttft=latency / 10)
    record(org_a, key, "beta", 50, DAY1, 9999, status=UsageStatus.UPSTREAM_ERROR)
    record(org_a, key, "beta", 7, DAY3, 50, ttft=5)
    record(org_b, None, "alpha", 1000, DAY1, 1)
    return key


def test_series_per_day_and_model_add_up_to_the_report(org_a, usage):
    period = Period.parse(*PERIOD)
    series = per_day_and_model(org_a, period)
    assert series["days"] == ["2026-11-19", "2026-11-20", "2026-11-21", "2026-11-22"]
    assert series["models"]["alpha"]["total_tokens"] == [0, 44, 0, 0]
    assert series["models"]["beta"]["total_tokens"] == [0, 51, 0, 8]
    assert series["models"]["beta"]["failed_requests"] == [0, 1, 0, 0]
    assert series["models"]["alpha"]["requests"] == [0, 4, 0, 0]
    by_day = {row["day"]: row for row in report(org_a, period, "day")["data"]}
    for i, day in enumerate(series["days"]):
        charted = sum(m["total_tokens"][i] for m in series["models"].values())
        assert charted == (by_day[day]["total_tokens"] if day in by_day else 0)
        cost = sum(m["cost"][i] for m in series["models"].values())
        assert cost == pytest.approx(float(Decimal(by_day[day]["cost"])) if day in by_day else 0)


def test_series_read_rolled_up_days_like_the_report(org_a, usage):
    rollup_day(DAY1.date())
    DailyUsage.objects.filter(organization=org_a).update(updated_at=DAY1 + dt.timedelta(days=2))
    UsageRecord.objects.filter(organization=org_a, created_at__date=DAY1.date()).delete()  # only the roll-up is left
    series = per_day_and_model(org_a, Period.parse(*PERIOD))
    assert series["models"]["alpha"]["total_tokens"] == [0, 44, 0, 0]
    assert series["models"]["beta"]["total_tokens"] == [0, 51, 0, 8]


def test_timing_percentiles_of_completed_requests(org_a, usage):
    timings = timing_percentiles(org_a, Period.parse(*PERIOD))
    # percentile_cont over 100, 200, 300, 400 (the failed 9999 ms request is left out)
    assert timings["latency_p50"] == [None, 250.0, None, 50.0]
    assert timings["latency_p95"] == [None, 385.0, None, 50.0]
    assert timings["ttft_p50"] == [None, 25.0, None, 5.0]
    completed = UsageRecord.objects.for_org(org_a).filter(status=UsageStatus.OK)
    python = {row["day"].isoformat(): row for row in _python_percentiles(
        completed.annotate(day=TruncDate("created_at", tzinfo=dt.UTC)))}
    assert python["2026-11-20"]["latency_p95"] == 385.0 and python["2026-11-20"]["ttft_p50"] == 25.0
    assert _percentile_cont([], 0.5) is None and _percentile_cont([7.0], 0.95) == 7.0


def test_usage_page_draws_charts_or_says_there_is_nothing(client_a, org_a, usage):
    page = client_a.get("/usage/", {"start": PERIOD[0], "end": PERIOD[1]})
    html = page.content.decode()
    assert 'id="usage-charts"' in html and 'id="chart-tokens"' in html and "js/usage-charts.js" in html
    assert page.context["charts"] == usage_charts(org_a, Period.parse(*PERIOD))
    empty = client_a.get("/usage/", {"start": "2025-01-01", "end": "2025-01-31"}).content.decode()
    assert "No usage in this period" in empty and "chart.umd.min.js" not in empty and "<canvas" not in empty
