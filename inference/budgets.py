"""Budgets set from the console: an organization's budget and each API key's, by its owners and admins.

Services write (`set_budget`, `remove_budget`): plain arguments, one transaction, the budget row locked
so the check against what is spent sees the counters the gateway moves. Only `limit` is ever written back
(the gateway's `spent` and `reserved` are never overwritten). The audit log records the change (Budget is
`audited`, the console request's context names who made it)."""

from __future__ import annotations

from decimal import Decimal

from django.db import transaction

from accounts.models import APIKey, Membership
from accounts.tenancy import require_manager

from .models import Budget


class BudgetError(Exception):
    """A budget rule refused the change; the message is shown as is."""


def _locked(membership: Membership, api_key: APIKey | None) -> Budget | None:
    require_manager(membership)
    if api_key is not None:
        assert api_key.organization_id == membership.organization_id, "views scope the key to the organization"
    return (Budget.objects.for_org(membership.organization).select_for_update()
            .filter(api_key=api_key).first())


@transaction.atomic
def set_budget(membership: Membership, limit: Decimal, api_key: APIKey | None = None) -> Budget:
    """Create or change the budget of the membership's organization (no key) or of one of its keys."""
    budget = _locked(membership, api_key)
    if refusal := (budget or Budget()).limit_refusal(limit):
        raise BudgetError(refusal)
    if budget is None:
        return Budget.objects.create(organization=membership.organization, api_key=api_key, limit=limit)
    budget.limit = limit
    budget.save(update_fields=["limit"])
    return budget


@transaction.atomic
def remove_budget(membership: Membership, api_key: APIKey | None = None) -> bool:
    """Remove the budget (no spending limit any more); False when there was none. Holds on it are then
    settled against the remaining budgets only (reservations drop the reference)."""
    budget = _locked(membership, api_key)
    if budget is None:
        return False
    budget.delete()
    return True
