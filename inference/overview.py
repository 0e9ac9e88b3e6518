"""The operator overview (staff only): platform-wide requests, tokens, errors and cost per day, the top
organizations, every replica's health, and the quota and rate-limit refusals the gateway counted."""

from __future__ import annotations

import datetime as dt
import os
from decimal import Decimal

from django.db.models import Count, F, Q, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from .catalog import Catalog
from .models import Deployment, UsageRecord, UsageStatus

DAYS = 14
TOP = 5


def platform_days(days: int = DAYS, now=None) -> list[dict]:
    """The last `days` UTC days, newest first: requests, failed, tokens, cost and the top organizations
    by tokens (from the usage records)."""
    now = now or timezone.now()
    first = (now - dt.timedelta(days=days - 1)).astimezone(dt.UTC).date()
    records = (UsageRecord.objects.filter(created_at__gte=dt.datetime.combine(first, dt.time.min, tzinfo=dt.UTC))
               .annotate(day=TruncDate("created_at", tzinfo=dt.UTC)))
    sums = {"requests": Count("id"), "failed": Count("id", filter=~Q(status=UsageStatus.OK)),
            "tokens": Sum(F("prompt_tokens") + F("completion_tokens")), "cost": Sum("cost")}
    totals = {row["day"]: row for row in records.values("day").annotate(**sums)}
    tops: dict[dt.date, list[dict]] = {}
    per_org = (records.values("day", "organization__slug", "organization__name").annotate(**sums)
               .order_by("day", "-tokens"))
    for row in per_org:
        top = tops.setdefault(row["day"], [])
        if len(top) < TOP:
            top.append({"slug": row["organization__slug"], "name": row["organization__name"],
                        "tokens": row["tokens"] or 0, "requests": row["requests"]})
    out = []
    for offset in range(days):
        day = first + dt.timedelta(days=days - 1 - offset)
        row = totals.get(day, {})
        out.append({"day": day, "requests": row.get("requests", 0), "failed": row.get("failed", 0),
                    "tokens": row.get("tokens") or 0, "cost": row.get("cost") or Decimal(0), "top": tops.get(day, [])})
    return out


def replicas() -> list[dict]:
    """Every deployment with its model, health check result and the model's status, read now (not the
    gateway's catalog snapshot, which may be seconds old: an operator checks the page after a change)."""
    statuses = {name: entry.status for name, entry in Catalog.load_entries().items()}
    return [{"deployment": d, "model_status": statuses.get(d.model.name, "disabled")}
            for d in Deployment.objects.select_related("model").order_by("model__name", "pk")]


def refusals() -> list[dict]:
    """maas_gateway_quota_rejections as counted by the gateway (every worker when PROMETHEUS_MULTIPROC_DIR
    is set, else this process), since its start: by organization and reason."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    rows = []
    for family in registry.collect():
        if family.name != "maas_gateway_quota_rejections":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.value:
                rows.append({"organization": sample.labels["organization"], "reason": sample.labels["reason"],
                             "count": int(sample.value)})
    return sorted(rows, key=lambda r: (-r["count"], r["organization"], r["reason"]))
