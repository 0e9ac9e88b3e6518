"""Periodic work of the gateway (scheduled by CELERY_BEAT_SCHEDULE): each task is idempotent, so a
redelivered or overlapping run changes nothing twice, and database errors are retried with backoff."""

from __future__ import annotations

import datetime as dt
import logging

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import Count, Q, Sum
from django.utils import timezone

from accounts.models import Entitlement, Membership, Role

from .models import Budget, BudgetNotice, DailyUsage, EntitlementNotice, UsageRecord, UsageStatus

logger = logging.getLogger(__name__)

RETRY = {
    "autoretry_for": (DatabaseError,),
    "retry_backoff": 2,
    "retry_backoff_max": 300,
    "retry_jitter": True,
    "max_retries": 6,
    "acks_late": True,
}


def rollup_day(day: dt.date) -> int:
    """Rebuild the DailyUsage rows of one UTC day from the usage records; returns the row count."""
    start = dt.datetime.combine(day, dt.time.min, tzinfo=dt.UTC)
    groups = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=start + dt.timedelta(days=1))
        .values("organization_id", "model_name", "api_key_id", "source")
        .annotate(
            requests=Count("id"),
            failed_requests=Count("id", filter=~Q(status=UsageStatus.OK)),
            prompt_tokens=Sum("prompt_tokens"),
            cached_tokens=Sum("cached_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost=Sum("cost"),
        )
        .order_by()
    )
    rows = [DailyUsage(day=day, **group) for group in groups]
    with transaction.atomic():
        # Replace, not add: running the roll-up again for the same day gives the same rows.
        DailyUsage.objects.filter(day=day).delete()
        DailyUsage.objects.bulk_create(rows)
    return len(rows)


@shared_task(**RETRY)
def rollup_daily_usage(day: str | None = None) -> dict[str, int]:
    """Roll up `day` (ISO date), or today and yesterday (late settlements land in yesterday's rows)."""
    if day:
        days = [dt.date.fromisoformat(day)]
    else:
        today = timezone.now().astimezone(dt.UTC).date()
        days = [today - dt.timedelta(days=1), today]
    return {d.isoformat(): rollup_day(d) for d in days}


@shared_task(**RETRY)
def purge_expired_responses() -> int:
    """Stored /v1/responses past RESPONSES_RETENTION_DAYS."""
    from .responses import purge_expired

    return purge_expired()


@shared_task(**RETRY)
def expire_reservations() -> int:
    """Release the tokens held by requests that died without settling."""
    from .quotas import expire_reservations as expire

    return expire()


@shared_task(**RETRY)
def check_deployments() -> dict[str, int]:
    """Probe every enabled engine replica's /health and store the result (the gateway skips unhealthy ones)."""
    from .catalog import check_deployments as check

    return check()


# Percent of the token quota used, and days before the end, at which the organization's owners and
# admins are told (each once per entitlement).
QUOTA_THRESHOLDS = (80, 95, 100)
ENDS_WITHIN_DAYS = (7, 1)


def due_thresholds(entitlement: Entitlement, now: dt.datetime) -> list[str]:
    due = []
    if entitlement.token_quota:
        used = 100 * entitlement.tokens_used / entitlement.token_quota
        due += [f"quota-{p}" for p in QUOTA_THRESHOLDS if used >= p]
    if entitlement.ends_at is not None:
        left = entitlement.ends_at - now
        due += [f"ends-{d}d" for d in ENDS_WITHIN_DAYS if left <= dt.timedelta(days=d)]
    return due


def _notice_text(entitlement: Entitlement, thresholds: list[str]) -> tuple[str, str]:
    org = entitlement.organization
    lines = [f"Entitlement #{entitlement.pk} of organization {org.name} ({org.slug}):"]
    quota = [t for t in thresholds if t.startswith("quota-")]
    ends = [t for t in thresholds if t.startswith("ends-")]
    if quota:
        percent = max(int(t.split("-")[1]) for t in quota)
        lines.append(
            f"- {entitlement.tokens_used:,} of {entitlement.token_quota:,} tokens used "
            f"({'quota exhausted' if percent >= 100 else f'over {percent}%'})."
        )
    if ends:
        lines.append(f"- it ends on {entitlement.ends_at:%Y-%m-%d %H:%M} UTC.")
    lines.append("Redeem a new authorization code in the console to keep using the API.")
    if quota:
        subject = "[MaaS] Token quota " + ("exhausted" if "quota-100" in quota else "running low")
    else:
        subject = "[MaaS] Entitlement ending soon"
    return subject, "\n".join(lines)


def due_budget_thresholds(budget: Budget) -> list[str]:
    """Crossed thresholds, named with the limit they are of: raising the limit re-arms them."""
    used = budget.used_percent()
    return [f"budget-{p}@{budget.limit:.2f}" for p in settings.BUDGET_ALERT_THRESHOLDS if used >= p]


def _budget_notice_text(budget: Budget, thresholds: list[str]) -> tuple[str, str]:
    org = budget.organization
    whose = f"API key {budget.api_key.name} ({budget.api_key.redacted})" if budget.api_key else "the organization"
    percent = max(int(t.split("-")[1].split("@")[0]) for t in thresholds)
    state = "spent" if percent >= 100 else f"over {percent}% spent"
    lines = [f"Budget of {whose} in organization {org.name} ({org.slug}):",
             f"- ${budget.spent:.2f} of ${budget.limit:.2f} spent ({state}).",
             "Requests that could cost more than what is left are refused; an owner can raise the budget."]
    return f"[MaaS] Budget {'exhausted' if percent >= 100 else 'running low'}", "\n".join(lines)


def notify_budget_thresholds() -> int:
    """`notify_entitlement_thresholds` for budgets: once per crossed threshold and limit."""
    sent = 0
    for budget in Budget.objects.select_related("organization", "api_key").filter(spent__gt=0):
        due = due_budget_thresholds(budget)
        known = set(budget.notices.values_list("threshold", flat=True))
        new = [t for t in due if t not in known]
        if not new:
            continue
        claimed = []
        with transaction.atomic():
            for threshold in new:
                try:
                    with transaction.atomic():
                        BudgetNotice.objects.create(organization=budget.organization, budget=budget, threshold=threshold)
                    claimed.append(threshold)
                except IntegrityError:  # a concurrent run claimed it
                    pass
            recipients = _recipients(budget.organization)
            if claimed and recipients:
                subject, body = _budget_notice_text(budget, claimed)
                transaction.on_commit(
                    lambda s=subject, b=body, r=recipients: send_mail(s, b, settings.DEFAULT_FROM_EMAIL, r)
                )
                sent += 1
    return sent


def _recipients(organization) -> list[str]:
    return list(Membership.objects.filter(organization=organization, role__in=[Role.OWNER, Role.ADMIN])
                .values_list("user__email", flat=True))


@shared_task(**RETRY)
def notify_entitlement_thresholds() -> int:
    """Email the owners/admins once per crossed threshold (entitlements' quotas and ends, budgets);
    returns the number of emails queued."""
    now = timezone.now()
    sent = 0
    entitlements = Entitlement.objects.active(now).select_related("organization").filter(
        Q(token_quota__isnull=False) | Q(ends_at__isnull=False)
    )
    for entitlement in entitlements:
        due = due_thresholds(entitlement, now)
        if not due:
            continue
        known = set(entitlement.notices.values_list("threshold", flat=True))
        new = [t for t in due if t not in known]
        if not new:
            continue
        recipients = _recipients(entitlement.organization)
        claimed = []
        with transaction.atomic():
            for threshold in new:
                try:
                    with transaction.atomic():
                        EntitlementNotice.objects.create(
                            organization=entitlement.organization, entitlement=entitlement, threshold=threshold
                        )
                    claimed.append(threshold)
                except IntegrityError:  # a concurrent run claimed it
                    pass
            if claimed and recipients:
                subject, body = _notice_text(entitlement, claimed)
                # Queued after commit: an email only for thresholds this run recorded.
                transaction.on_commit(
                    lambda s=subject, b=body, r=recipients: send_mail(s, b, settings.DEFAULT_FROM_EMAIL, r)
                )
                sent += 1
    return sent + notify_budget_thresholds()


@shared_task(**RETRY)
def run_batch(batch_pk: int) -> str:
    """Run one batch (inference/batch_runner.py); routed to BATCH_QUEUE (CELERY_TASK_ROUTES)."""
    from .batch_runner import run

    return run(batch_pk)


@shared_task(**RETRY)
def resume_batches() -> int:
    """Queue a runner for each unfinished batch: those of a worker that died are taken up again."""
    from .batch_runner import resume

    return resume()


@shared_task(**RETRY)
def purge_expired_files() -> int:
    """Batch output and error files past their expiry (BATCH_FILES_RETENTION_DAYS or output_expires_after)."""
    from .files import purge_expired

    return purge_expired()
