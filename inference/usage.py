"""Usage reports of one organization over a period, grouped by model, API key or day: the one query
behind GET /api/usage and the console's usage page."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal

from django.db.models import Count, F, Min, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from accounts.models import Organization

from .models import DailyUsage, UsageRecord, UsageSource, UsageStatus

GROUPS = ("model", "key", "day")
DEFAULT_DAYS = 30
# A day's DailyUsage rows are final once built this long after the day ended (late commits).
ROLLUP_SETTLE = dt.timedelta(minutes=1)
SUMMED = ("requests", "failed_requests", "prompt_tokens", "cached_tokens", "completion_tokens", "cost")


class ReportError(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Period:
    start: dt.datetime  # inclusive
    end: dt.datetime  # exclusive

    @classmethod
    def parse(cls, start: str | None, end: str | None) -> Period:
        """ISO dates or datetimes (UTC when naive); an end given as a date includes that whole day.
        Default: the last 30 days up to now."""
        now = timezone.now()
        end_at = _parse(end, "end", end_of_day=True) if end else now
        start_at = _parse(start, "start", end_of_day=False) if start else end_at - dt.timedelta(days=DEFAULT_DAYS)
        if start_at >= end_at:
            raise ReportError("start", "'start' must be before 'end'.")
        if end_at - start_at > dt.timedelta(days=366):
            raise ReportError("start", "A report covers at most 366 days.")
        return cls(start_at, end_at)


def _parse(value: str, param: str, end_of_day: bool) -> dt.datetime:
    try:
        if len(value) == 10:
            day = dt.date.fromisoformat(value)
            moment = dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)
            return moment + dt.timedelta(days=1) if end_of_day else moment
        moment = dt.datetime.fromisoformat(value)
    except ValueError:
        raise ReportError(param, f"'{param}' must be an ISO date (YYYY-MM-DD) or datetime, got {value!r}.") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def report(organization: Organization, period: Period, group_by: str) -> dict:
    if group_by not in GROUPS:
        raise ReportError("group_by", f"'group_by' must be one of {', '.join(GROUPS)}.")
    # Whole days already rolled up (the Celery task) come from DailyUsage; the rest from the raw records.
    rolled = rolled_up_days(organization, period)
    records = (
        UsageRecord.objects.for_org(organization)
        .filter(created_at__gte=period.start, created_at__lt=period.end)
        .annotate(day=TruncDate("created_at", tzinfo=dt.UTC))
        .exclude(day__in=rolled)
    )
    sums = {
        "requests": Count("id"),
        "failed_requests": Count("id", filter=~Q(status=UsageStatus.OK)),
        "prompt_tokens": Sum("prompt_tokens"),
        "cached_tokens": Sum("cached_tokens"),
        "completion_tokens": Sum("completion_tokens"),
        "cost": Sum("cost"),
    }
    rollups = DailyUsage.objects.for_org(organization).filter(day__in=rolled)
    rollup_sums = {name: Sum(name) for name in SUMMED}
    if group_by == "model":
        rows = [*records.values(group=F("model_name")).annotate(**sums), *rollups.values(group=F("model_name")).annotate(**rollup_sums)]
    elif group_by == "day":
        rows = [*records.values(group=F("day")).annotate(**sums), *rollups.values(group=F("day")).annotate(**rollup_sums)]
    else:
        key_fields = {"group": F("api_key_id"), "source_": F("source"), "key_name": F("api_key__name"),
                      "key_id": F("api_key__public_id")}
        rows = [*records.values(**key_fields).annotate(**sums), *rollups.values(**key_fields).annotate(**rollup_sums)]
    data = [_row(group_by, row) for row in _merge(rows, group_by)]
    totals = {name: sum(r[name] for r in data) for name in
              ("requests", "failed_requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens")}
    totals["cost"] = str(sum((Decimal(r["cost"]) for r in data), Decimal(0)))
    return {
        "object": "usage_report",
        "organization": organization.slug,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "group_by": group_by,
        "data": data,
        "totals": totals,
    }


def rolled_up_days(organization: Organization, period: Period) -> list[dt.date]:
    """Whole UTC days of the period whose DailyUsage rows were built after the day was over."""
    first = period.start.astimezone(dt.UTC).date()
    if dt.datetime.combine(first, dt.time.min, tzinfo=dt.UTC) < period.start:
        first += dt.timedelta(days=1)
    last = (period.end.astimezone(dt.UTC) - dt.timedelta(days=1)).date()
    built = (
        DailyUsage.objects.for_org(organization).filter(day__gte=first, day__lte=last)
        .values("day").annotate(built=Min("updated_at"))
    )
    return [
        row["day"] for row in built
        if row["built"] >= dt.datetime.combine(row["day"], dt.time.min, tzinfo=dt.UTC) + dt.timedelta(days=1) + ROLLUP_SETTLE
    ]


def _merge(rows: list[dict], group_by: str) -> list[dict]:
    """Add up rows of the same group (one from the raw records, one from the rollups), in report order."""
    merged: dict = {}
    for row in rows:
        into = merged.setdefault((row["group"], row.get("source_")), {**row, **dict.fromkeys(SUMMED, 0)})
        for name in SUMMED:
            into[name] += row[name] or 0
    if group_by == "key":
        return sorted(merged.values(), key=lambda r: (r["key_name"] is None, r["key_name"] or "", r["group"] or 0, r["source_"]))
    return sorted(merged.values(), key=lambda r: r["group"])


def _row(group_by: str, row: dict) -> dict:
    out: dict = {}
    if group_by == "model":
        out["model"] = row["group"]
    elif group_by == "day":
        out["day"] = row["group"].isoformat()
    else:
        playground = row["source_"] == UsageSource.PLAYGROUND
        out["api_key"] = {
            "id": f"sk-{row['key_id']}" if row["key_id"] else None,
            "name": row["key_name"] or ("Playground" if playground else "(deleted key)"),
            "source": row["source_"],
        }
    prompt, completion = row["prompt_tokens"] or 0, row["completion_tokens"] or 0
    out.update(
        requests=row["requests"],
        failed_requests=row["failed_requests"],
        prompt_tokens=prompt,
        cached_tokens=row["cached_tokens"] or 0,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        cost=str(row["cost"] or Decimal(0)),
    )
    return out


def day_series(period: Period, by_day: list[dict]) -> list[dict]:
    """One entry per day of the period (zero where nothing was used), for the chart."""
    known = {row["day"]: row for row in by_day}
    first = period.start.astimezone(dt.UTC).date()
    last = (period.end - dt.timedelta(microseconds=1)).astimezone(dt.UTC).date()
    days = []
    day = first
    while day <= last:
        row = known.get(day.isoformat())
        days.append({"day": day, "total_tokens": row["total_tokens"] if row else 0,
                     "requests": row["requests"] if row else 0})
        day += dt.timedelta(days=1)
    return days
