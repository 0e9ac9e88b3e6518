"""API key services: create (member or service key), roll (a successor, the old key ending after a
grace period), revoke, and revoking a person's member keys when they leave (accounts/signals.py)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from .models import APIKey, KeyKind, Membership


class KeyRuleError(Exception):
    """A key rule refused the action; `param` names the input at fault, `status` the HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def check_can_create(membership: Membership, kind: str) -> None:
    if kind == KeyKind.SERVICE and not membership.can_manage:
        raise KeyRuleError("Only owners and admins create organization service keys.", param="kind")


def check_can_manage_key(membership: Membership, key: APIKey) -> None:
    """Owners and admins act on any key of the organization; members only on the keys they created."""
    if not membership.can_manage and key.created_by_id != membership.user_id:
        raise PermissionDenied("Only owners, admins and the key's creator can do that.")


def create_key(membership: Membership, kind: str = KeyKind.MEMBER, **fields) -> tuple[APIKey, str]:
    check_can_create(membership, kind)
    return APIKey.objects.create_key(membership.organization, created_by=membership.user, kind=kind, **fields)


@transaction.atomic
def roll_key(membership: Membership, key: APIKey, grace_seconds: int) -> tuple[APIKey, str]:
    """A successor with the same name, owner, kind, limits and end date; the old key keeps working for
    `grace_seconds` (0: stops now), then stops. Returns the successor and its raw key (shown once)."""
    check_can_manage_key(membership, key)
    limit = settings.KEY_ROTATION_MAX_GRACE_SECONDS
    if not 0 <= grace_seconds <= limit:
        raise KeyRuleError(f"The grace period is 0 to {limit} seconds.", param="grace_seconds")
    old = APIKey.objects.select_for_update().get(pk=key.pk)
    now = timezone.now()
    if not old.is_usable(now) or old.revoked_at is not None:
        raise KeyRuleError(f"The key is {old.status}; only an active key can be rolled.", status=409)
    if APIKey.objects.filter(rotated_from=old).exists():
        raise KeyRuleError("This key was already rolled; roll its successor instead.", status=409)
    new, raw = APIKey.objects.create_key(
        old.organization, old.name, created_by=old.created_by, kind=old.kind, expires_at=old.expires_at,
        allowed_models=old.allowed_models, requests_per_minute=old.requests_per_minute,
        tokens_per_minute=old.tokens_per_minute, rotated_from=old,
    )
    if grace_seconds == 0:
        old.revoked_at = now
        old.save(update_fields=["revoked_at"])
    else:
        ends = now + timedelta(seconds=grace_seconds)
        if old.expires_at is None or ends < old.expires_at:
            old.expires_at = ends
            old.save(update_fields=["expires_at"])
    key.refresh_from_db()
    return new, raw


def revoke_member_keys(user_id: int, organization_id: int | None = None) -> int:
    """Revoke a user's member keys (in one organization, or everywhere); service keys stay."""
    keys = APIKey.objects.filter(created_by_id=user_id, kind=KeyKind.MEMBER, revoked_at__isnull=True)
    if organization_id is not None:
        keys = keys.filter(organization_id=organization_id)
    return keys.update(revoked_at=timezone.now())
