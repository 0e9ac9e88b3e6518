"""Budgets outside the gateway: the admin edits a limit with the quota's validation (never below spent +
held, never written back over the gateway's counters), the console shows them (usage and keys pages),
and the notification task emails the owners once per crossed threshold and limit."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core import mail

from accounts.models import APIKey, User
from accounts.tenancy import create_organization
from inference.models import Budget, BudgetNotice
from inference.tasks import notify_entitlement_thresholds

pytestmark = pytest.mark.django_db

BUDGETS = "/admin/inference/budget/"


@pytest.fixture
def owner():
    return User.objects.create_user("budget-owner@example.com", "pw-123456789")


@pytest.fixture
def org(owner):
    return create_organization(owner, "Budget Org")


@pytest.fixture
def admin_client(client):
    client.force_login(User.objects.create_superuser("root-budgets@example.com", "pw-not-used-123"))
    return client


def test_the_admin_refuses_a_limit_below_spent_and_held_and_writes_only_the_limit(admin_client, org):
    budget = Budget.objects.create(organization=org, limit=Decimal("10"), spent=Decimal("3"), reserved=Decimal("2"))
    refused = admin_client.post(f"{BUDGETS}{budget.pk}/change/", {"limit": "4.99"})
    assert refused.status_code == 200
    assert "the limit cannot be lower than $5.000000" in refused.content.decode()
    Budget.objects.filter(pk=budget.pk).update(spent=Decimal("4"))  # the gateway settles while the form is open
    saved = admin_client.post(f"{BUDGETS}{budget.pk}/change/", {"limit": "6"})
    assert saved.status_code == 302
    budget.refresh_from_db()
    assert (budget.limit, budget.spent, budget.reserved) == (Decimal("6"), Decimal("4"), Decimal("2"))
    assert "zero or more" in admin_client.post(f"{BUDGETS}{budget.pk}/change/", {"limit": "-1"}).content.decode()


def test_the_admin_adds_a_key_budget_only_for_that_keys_organization(admin_client, org, owner):
    other = create_organization(User.objects.create_user("budget-other@example.com", "pw-123456789"), "Other")
    key, _ = APIKey.objects.create_key(other, "theirs")
    refused = admin_client.post(f"{BUDGETS}add/", {"organization": org.pk, "api_key": key.pk, "limit": "1"})
    assert "This key belongs to another organization." in refused.content.decode()
    Budget.objects.create(organization=org, limit=Decimal("1"))
    second = admin_client.post(f"{BUDGETS}add/", {"organization": org.pk, "limit": "2"})
    assert second.status_code == 200 and Budget.objects.filter(organization=org).count() == 1  # one per org


def login(client, user, org):
    client.force_login(user)
    session = client.session
    session["organization_id"] = org.pk
    session.save()


def test_the_console_shows_the_budgets_on_the_usage_and_keys_pages(client, owner, org):
    key, _ = APIKey.objects.create_key(org, "capped", created_by=owner)
    APIKey.objects.create_key(org, "uncapped", created_by=owner)
    Budget.objects.create(organization=org, limit=Decimal("20"), spent=Decimal("5"), reserved=Decimal("1"))
    Budget.objects.create(organization=org, api_key=key, limit=Decimal("2"), spent=Decimal("0.5"))
    login(client, owner, org)
    usage = client.get("/usage/").content.decode()
    assert "the organization" in usage and "$5.0000 (25%)" in usage and "$14.0000" in usage  # left: 20 - 5 - 1
    assert "key capped" in usage and "$0.5000 (25%)" in usage
    keys = client.get("/keys/").content.decode()
    assert "$0.5000 of $2.00" in keys and "<td data-label=\"Budget\">organization's</td>" in keys


def test_budget_alerts_go_out_once_per_threshold_and_again_after_a_raise(settings, org, owner,
                                                                         django_capture_on_commit_callbacks):
    settings.BUDGET_ALERT_THRESHOLDS = [50, 90]
    budget = Budget.objects.create(organization=org, limit=Decimal("10"), spent=Decimal("6"))
    with django_capture_on_commit_callbacks(execute=True):
        notify_entitlement_thresholds()
    assert [m.subject for m in mail.outbox] == ["[MaaS] Budget running low"]
    assert mail.outbox[0].to == [owner.email] and "$6.00 of $10.00 spent (over 50% spent)" in mail.outbox[0].body
    with django_capture_on_commit_callbacks(execute=True):
        notify_entitlement_thresholds()  # nothing new crossed
    assert len(mail.outbox) == 1
    Budget.objects.filter(pk=budget.pk).update(limit=Decimal("100"), spent=Decimal("95"))
    with django_capture_on_commit_callbacks(execute=True):
        notify_entitlement_thresholds()  # a new limit: its thresholds are new
    assert len(mail.outbox) == 2 and "over 90% spent" in mail.outbox[1].body
    assert set(BudgetNotice.objects.values_list("threshold", flat=True)) == {
        "budget-50@10.00", "budget-50@100.00", "budget-90@100.00"}
