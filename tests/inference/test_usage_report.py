"""GET /api/usage and the console usage page: org-scoped sums by model, key and day."""

from __future__ import annotations

import datetime as dt
import re
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
    assert not re.search(r"\b(999|1998)\b", html)  # the other organization's usage (not a key's random id)


def test_usage_page_reports_bad_dates(client, setup):
    user, org, *_ = setup
    login(client, user, org)
    response = client.get("/usage/", {"start": "nope"})
    assert response.status_code == 200 and "must be an ISO date" in response.content.decode()


# --- the report's service (inference/usage.py), without the view -------------------------------------

UTC = dt.UTC


def test_a_period_of_dates_covers_whole_utc_days_and_defaults_to_the_last_30_days():
    from django.utils import timezone

    from inference.usage import Period

    days = Period.parse("2026-11-20", "2026-11-21")
    assert (days.start, days.end) == (dt.datetime(2026, 11, 20, tzinfo=UTC), dt.datetime(2026, 11, 22, tzinfo=UTC))
    before = timezone.now()
    default = Period.parse(None, None)
    assert before <= default.end <= timezone.now() and default.end - default.start == dt.timedelta(days=30)
    since = Period.parse("2026-11-20T10:30:00", "2026-11-21T08:00:00+02:00")  # naive is UTC; offsets kept
    assert since.start == dt.datetime(2026, 11, 20, 10, 30, tzinfo=UTC)
    assert since.end == dt.datetime(2026, 11, 21, 6, tzinfo=UTC)
    until = Period.parse(None, "2026-11-21")
    assert until.start == dt.datetime(2026, 10, 23, tzinfo=UTC)  # 30 days before the end
    longest = Period.parse("2025-11-21", "2026-11-21")  # 366 days, the end day included
    assert longest.end - longest.start == dt.timedelta(days=366)


@pytest.mark.parametrize(("start", "end", "param", "says"), [
    ("2026-11-21", "2026-11-20", "start", "'start' must be before 'end'."),
    ("2026-11-21T00:00:00", "2026-11-21T00:00:00", "start", "'start' must be before 'end'."),
    ("2025-11-20", "2026-11-21", "start", "A report covers at most 366 days."),
    ("2026-13-01", None, "start", "'start' must be an ISO date (YYYY-MM-DD) or datetime, got '2026-13-01'."),
    (None, "soon", "end", "'end' must be an ISO date (YYYY-MM-DD) or datetime, got 'soon'."),
])
def test_a_bad_period_names_its_parameter(start, end, param, says):
    from inference.usage import Period, ReportError

    with pytest.raises(ReportError) as refused:
        Period.parse(start, end)
    assert (refused.value.param, str(refused.value)) == (param, says)


def test_the_report_sums_cached_tokens_failures_and_cost_and_names_its_period(setup):
    from inference.usage import Period, ReportError, report

    user, org, key_a, key_b = setup
    record(org, None, "smollm2", 7, 3, dt.datetime(2026, 11, 21, 9, tzinfo=UTC), status=UsageStatus.CLIENT_DISCONNECTED)
    UsageRecord.objects.filter(organization=org, prompt_tokens=20).update(cached_tokens=16)
    period = Period.parse("2026-11-20", "2026-11-21")
    out = report(org, period, "model")
    assert {k: out[k] for k in ("object", "organization", "start", "end", "group_by")} == {
        "object": "usage_report", "organization": org.slug, "start": "2026-11-20T00:00:00+00:00",
        "end": "2026-11-22T00:00:00+00:00", "group_by": "model"}
    smollm2 = out["data"][1]
    assert smollm2 == {"model": "smollm2", "requests": 3, "failed_requests": 1, "prompt_tokens": 37, "cached_tokens": 16,
                       "completion_tokens": 13, "total_tokens": 50, "cost": "0.05000000"}
    assert out["totals"] == {"requests": 4, "failed_requests": 2, "prompt_tokens": 137, "cached_tokens": 16,
                             "completion_tokens": 13, "total_tokens": 150, "cost": "0.15000000"}
    by_key = report(org, period, "key")["data"]
    assert [(r["api_key"]["id"], r["api_key"]["name"], r["api_key"]["source"], r["requests"]) for r in by_key] == [
        (f"sk-{key_a.public_id}", "alpha", "api", 2), (f"sk-{key_b.public_id}", "beta", "api", 1),
        (None, "(deleted key)", "api", 1)]  # no key and not the playground: its key is gone
    with pytest.raises(ReportError) as refused:
        report(org, period, "week")
    assert (refused.value.param, str(refused.value)) == ("group_by", "'group_by' must be one of model, key, day.")


def test_an_empty_report_has_zero_totals():
    from accounts.tenancy import create_organization
    from inference.usage import Period, report

    org = create_organization(User.objects.create_user("empty@example.com", "pw-123456789"), "Empty Org")
    out = report(org, Period.parse("2026-11-20", "2026-11-21"), "day")
    assert out["data"] == [] and out["totals"] == {
        "requests": 0, "failed_requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
        "total_tokens": 0, "cost": "0"}


def test_the_day_series_has_every_day_of_the_period_zero_where_nothing_was_used():
    from inference.usage import Period, day_series

    period = Period(dt.datetime(2026, 11, 19, 12, tzinfo=UTC), dt.datetime(2026, 11, 22, tzinfo=UTC))  # end exclusive
    series = day_series(period, [{"day": "2026-11-20", "total_tokens": 15, "requests": 1}])
    assert series == [
        {"day": dt.date(2026, 11, 19), "total_tokens": 0, "requests": 0},
        {"day": dt.date(2026, 11, 20), "total_tokens": 15, "requests": 1},
        {"day": dt.date(2026, 11, 21), "total_tokens": 0, "requests": 0},
    ]


@pytest.mark.parametrize("time_zone", ["UTC", "America/New_York"])
def test_only_whole_days_of_the_period_rolled_up_after_they_ended_count_as_rolled_up(setup, settings, time_zone):
    """Days are UTC days whatever TIME_ZONE (and so the process's local zone) is."""
    from inference.models import DailyUsage
    from inference.tasks import rollup_day
    from inference.usage import ROLLUP_SETTLE, Period, rolled_up_days

    settings.TIME_ZONE = time_zone
    user, org, *_ = setup
    for day in (dt.date(2026, 11, 20), dt.date(2026, 11, 21)):
        rollup_day(day)
    built = DailyUsage.objects.filter(organization=org)
    settled = dt.datetime(2026, 11, 22, tzinfo=UTC) + ROLLUP_SETTLE
    built.filter(day=dt.date(2026, 11, 21)).update(updated_at=settled)  # just final
    built.filter(day=dt.date(2026, 11, 20)).update(updated_at=dt.datetime(2026, 11, 21, tzinfo=UTC) + ROLLUP_SETTLE)
    whole = Period(dt.datetime(2026, 11, 20, tzinfo=UTC), dt.datetime(2026, 11, 22, tzinfo=UTC))
    assert sorted(rolled_up_days(org, whole)) == [dt.date(2026, 11, 20), dt.date(2026, 11, 21)]
    # a period starting within the 20th, or ending within the 21st, leaves that day to the raw records
    assert rolled_up_days(org, Period(whole.start + dt.timedelta(seconds=1), whole.end)) == [dt.date(2026, 11, 21)]
    assert rolled_up_days(org, Period(whole.start, whole.end - dt.timedelta(seconds=1))) == [dt.date(2026, 11, 20)]
    built.filter(day=dt.date(2026, 11, 21)).update(updated_at=settled - dt.timedelta(seconds=1))  # built too early
    assert rolled_up_days(org, whole) == [dt.date(2026, 11, 20)]


def test_the_report_counts_only_records_from_the_start_of_the_period_on(setup):
    from inference.usage import Period, report

    user, org, *_ = setup
    second_day = report(org, Period.parse("2026-11-21", "2026-11-21"), "model")
    assert second_day["totals"]["requests"] == 2  # the record of the 20th is before the start


def test_report_days_are_utc_days_whatever_the_time_zone(setup, settings):
    from inference.usage import Period, report

    settings.TIME_ZONE = "America/New_York"  # 02:00 UTC on the 21st is still the 20th there
    user, org, *_ = setup
    record(org, None, "smollm2", 1, 1, dt.datetime(2026, 11, 21, 2, tzinfo=UTC))
    by_day = report(org, Period.parse("2026-11-20", "2026-11-21"), "day")["data"]
    assert [(r["day"], r["requests"]) for r in by_day] == [("2026-11-20", 1), ("2026-11-21", 3)]


def test_keys_are_ordered_by_name_then_by_key(setup):
    """Not by creation: a key made first with a later name comes later; same-named keys in key order."""
    from inference.models import UsageSource
    from inference.usage import Period, report

    user, org, *_ = setup
    zeta, _ = APIKey.objects.create_key(org, "zeta", created_by=user)
    aardvark, _ = APIKey.objects.create_key(org, "aardvark", created_by=user)
    first_dup, _ = APIKey.objects.create_key(org, "dup", created_by=user)
    second_dup, _ = APIKey.objects.create_key(org, "dup", created_by=user)
    when = dt.datetime(2026, 11, 25, 10, tzinfo=UTC)
    for key in (zeta, aardvark, second_dup):
        record(org, key, "smollm2", 1, 1, when)
    record(org, first_dup, "smollm2", 1, 1, when)
    UsageRecord.objects.filter(api_key=first_dup).update(source=UsageSource.BATCH)  # sorts after "api"
    data = report(org, Period.parse("2026-11-25", "2026-11-25"), "key")["data"]
    assert [(r["api_key"]["id"], r["api_key"]["source"]) for r in data] == [
        (f"sk-{aardvark.public_id}", "api"), (f"sk-{first_dup.public_id}", "batch"),
        (f"sk-{second_dup.public_id}", "api"), (f"sk-{zeta.public_id}", "api")]


def test_a_group_with_no_tokens_and_no_cost_reports_zeros(setup):
    from inference.usage import Period, report

    user, org, *_ = setup
    record(org, None, "refused-model", 0, 0, dt.datetime(2026, 11, 25, 10, tzinfo=UTC), status=UsageStatus.UPSTREAM_ERROR)
    out = report(org, Period.parse("2026-11-25", "2026-11-25"), "model")
    assert out["data"] == [{"model": "refused-model", "requests": 1, "failed_requests": 1, "prompt_tokens": 0,
                            "cached_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost": "0"}]
    assert out["totals"]["cost"] == "0"


def test_the_day_series_follows_utc_days_whatever_the_time_zone(settings):
    from inference.usage import Period, day_series

    settings.TIME_ZONE = "America/New_York"  # both ends fall on the day before there
    period = Period(dt.datetime(2026, 11, 19, tzinfo=UTC), dt.datetime(2026, 11, 21, 3, tzinfo=UTC))
    assert [d["day"] for d in day_series(period, [])] == [dt.date(2026, 11, 19), dt.date(2026, 11, 20),
                                                          dt.date(2026, 11, 21)]


def test_the_day_series_includes_a_day_of_which_only_its_first_instant_is_in_the_period():
    from inference.usage import Period, day_series

    period = Period(dt.datetime(2026, 11, 19, tzinfo=UTC), dt.datetime(2026, 11, 20, 0, 0, 0, 1, tzinfo=UTC))
    assert [d["day"] for d in day_series(period, [])] == [dt.date(2026, 11, 19), dt.date(2026, 11, 20)]
