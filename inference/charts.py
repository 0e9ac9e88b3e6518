"""The series behind the usage page's charts (static/js/usage-charts.js draws them with Chart.js): per day
and model, the same split of rolled-up days and raw records as the usage report, so the charts and
GET /api/usage add up to the same numbers; and per-day time-to-first-token and latency percentiles
from the raw records (the roll-up keeps no timings)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

from django.db import connection
from django.db.models import Aggregate, Count, F, FloatField, Q, Sum
from django.db.models.functions import TruncDate

from accounts.models import Organization

from .models import DailyUsage, UsageRecord, UsageStatus
from .usage import Period, day_series, report, rolled_up_days

PERCENTILES = (0.5, 0.95)


class Percentile(Aggregate):
    """PostgreSQL's percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)."""

    function = "percentile_cont"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, fraction: float, **extra):
        super().__init__(expression, fraction=float(fraction), **extra)


def days_of(period: Period) -> list[str]:
    return [d["day"].isoformat() for d in day_series(period, [])]


def per_day_and_model(organization: Organization, period: Period) -> dict:
    """{"days": [...], "models": {name: {"total_tokens": [...], "cost": [...], "requests": [...],
    "failed_requests": [...]}}}: one value per day of the period, zero where nothing was used."""
    rolled = rolled_up_days(organization, period)
    raw = (
        UsageRecord.objects.for_org(organization)
        .filter(created_at__gte=period.start, created_at__lt=period.end)
        .annotate(day=TruncDate("created_at", tzinfo=dt.UTC)).exclude(day__in=rolled)
        .values("day", "model_name")
        .annotate(requests=Count("id"), failed_requests=Count("id", filter=~Q(status=UsageStatus.OK)),
                  tokens=Sum(F("prompt_tokens") + F("completion_tokens")), cost=Sum("cost"))
    )
    rollups = (
        DailyUsage.objects.for_org(organization).filter(day__in=rolled).values("day", "model_name")
        .annotate(requests=Sum("requests"), failed_requests=Sum("failed_requests"),
                  tokens=Sum(F("prompt_tokens") + F("completion_tokens")), cost=Sum("cost"))
    )
    days = days_of(period)
    index = {day: i for i, day in enumerate(days)}
    models: dict[str, dict[str, list]] = {}
    for row in [*raw, *rollups]:
        i = index.get(row["day"].isoformat())
        if i is None:
            continue
        series = models.setdefault(row["model_name"], {
            "total_tokens": [0] * len(days), "cost": [Decimal(0)] * len(days), "requests": [0] * len(days),
            "failed_requests": [0] * len(days)})
        series["total_tokens"][i] += row["tokens"] or 0
        series["cost"][i] += row["cost"] or Decimal(0)
        series["requests"][i] += row["requests"] or 0
        series["failed_requests"][i] += row["failed_requests"] or 0
    for series in models.values():
        series["cost"] = [float(c) for c in series["cost"]]  # chart values, not money arithmetic
    return {"days": days, "models": dict(sorted(models.items()))}


def timing_percentiles(organization: Organization, period: Period) -> dict:
    """Per day: p50 and p95 of time to first token and of latency (ms) over completed requests."""
    records = (
        UsageRecord.objects.for_org(organization)
        .filter(created_at__gte=period.start, created_at__lt=period.end, status=UsageStatus.OK)
        .annotate(day=TruncDate("created_at", tzinfo=dt.UTC))
    )
    days = days_of(period)
    out = {f"{name}_p{round(p * 100)}": [None] * len(days) for name in ("ttft", "latency") for p in PERCENTILES}
    index = {day: i for i, day in enumerate(days)}
    if connection.vendor == "postgresql":
        aggregates = {f"{name}_p{round(p * 100)}": Percentile(field, p)
                      for name, field in (("ttft", "time_to_first_token_ms"), ("latency", "latency_ms"))
                      for p in PERCENTILES}
        rows = records.values("day").annotate(**aggregates)
    else:  # SQLite (development): the same numbers, computed here
        rows = _python_percentiles(records)
    for row in rows:
        i = index.get(row["day"].isoformat())
        if i is not None:
            for name in out:
                out[name][i] = round(row[name], 1) if row[name] is not None else None
    return {"days": days, **out}


def _python_percentiles(records) -> list[dict]:
    by_day: dict = {}
    for day, ttft, latency in records.values_list("day", "time_to_first_token_ms", "latency_ms"):
        values = by_day.setdefault(day, {"ttft": [], "latency": []})
        if ttft is not None:
            values["ttft"].append(ttft)
        values["latency"].append(latency)
    rows = []
    for day, values in by_day.items():
        row = {"day": day}
        for name, found in values.items():
            for p in PERCENTILES:
                row[f"{name}_p{round(p * 100)}"] = _percentile_cont(sorted(found), p)
        rows.append(row)
    return rows


def _percentile_cont(values: list[float], fraction: float) -> float | None:
    """Linear interpolation between the closest ranks, as PostgreSQL's percentile_cont."""
    if not values:
        return None
    position = fraction * (len(values) - 1)
    low = int(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


def per_key(organization: Organization, period: Period) -> list[dict]:
    """The usage report by key, as chart labels and values."""
    return [{"label": row["api_key"]["name"], "total_tokens": row["total_tokens"], "cost": float(Decimal(row["cost"])),
             "requests": row["requests"]} for row in report(organization, period, "key")["data"]]


def usage_charts(organization: Organization, period: Period) -> dict:
    """Everything the usage page's script draws, as one JSON document (json_script)."""
    return {"by_day": per_day_and_model(organization, period), "timings": timing_percentiles(organization, period),
            "by_key": per_key(organization, period)}
