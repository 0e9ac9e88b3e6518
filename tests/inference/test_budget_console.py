"""Budgets outside the gateway: the admin edits a limit with the quota's validation (never below spent +
held, never written back over the gateway's counters), the console shows them (usage and keys pages) and
lets owners and admins set, change and remove them (budgets page: audited, refused to members, another
organization's key a 404), and the notification task emails the owners once per crossed threshold and limit."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.core import mail

from accounts import audit
from accounts.models import APIKey, Membership, Role, User
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
    assert "$3.00 is already spent and $2.00 held by requests in flight: the limit cannot be lower than $5.00." in refused.content.decode()
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


def test_an_owner_sets_changes_and_removes_the_organization_budget_and_each_change_is_audited(client, owner, org):
    login(client, owner, org)
    assert 'href="/budgets/">Set or change budgets</a>' in client.get("/usage/").content.decode()
    assert client.post("/budgets/", {"org-limit": "25"}).status_code == 302
    budget = Budget.objects.get(organization=org, api_key=None)
    assert budget.limit == Decimal("25")
    Budget.objects.filter(pk=budget.pk).update(spent=Decimal("3"), reserved=Decimal("1"))  # the gateway meanwhile
    assert client.post("/budgets/", {"org-limit": "12.50"}).status_code == 302
    budget.refresh_from_db()
    assert (budget.limit, budget.spent, budget.reserved) == (Decimal("12.50"), Decimal("3"), Decimal("1"))
    page = client.get("/budgets/").content.decode()
    assert "$3.0000 spent, $1.0000 held by requests in flight, of $12.50." in page
    assert client.post("/budgets/", {"action": "remove"}).status_code == 302
    assert not Budget.objects.filter(organization=org).exists()
    changes = [e for e in audit.organization_events(org) if e.model == "budget"]
    assert [e.action for e in changes] == ["delete", "update", "insert"]
    assert {e.actor for e in changes} == {owner.email}
    assert ("limit", Decimal("25"), Decimal("12.50")) in changes[1].changes


@pytest.mark.parametrize("limit,error", [
    ("-1", "The limit must be zero or more"),
    ("ten", "Enter the limit as a number of dollars"),
    ("1.005", "at most 2 decimal places"),
    ("3.99", "$3.00 is already spent and $1.00 held by requests in flight: the limit cannot be lower than $4.00."),
])
def test_the_budget_form_refuses_a_bad_limit_and_changes_nothing(client, owner, org, limit, error):
    Budget.objects.create(organization=org, limit=Decimal("10"), spent=Decimal("3"), reserved=Decimal("1"))
    login(client, owner, org)
    refused = client.post("/budgets/", {"org-limit": limit})
    assert refused.status_code == 400
    assert error in refused.content.decode().replace("&#x27;", "'")
    assert Budget.objects.get(organization=org).limit == Decimal("10")


def test_an_admin_sets_and_removes_a_keys_budget_and_the_keys_page_shows_it(client, owner, org):
    admin = User.objects.create_user("budget-admin@example.com", "pw-123456789")
    Membership.objects.create(organization=org, user=admin, role=Role.ADMIN)
    key, _ = APIKey.objects.create_key(org, "capped", created_by=owner)
    login(client, admin, org)
    assert client.post(f"/budgets/keys/{key.pk}/", {f"key-{key.pk}-limit": "2"}).status_code == 302
    assert Budget.objects.get(api_key=key).limit == Decimal("2")
    assert "$0.0000 of $2.00" in client.get("/keys/").content.decode()
    refused = client.post(f"/budgets/keys/{key.pk}/", {f"key-{key.pk}-limit": "-2"})
    assert refused.status_code == 400 and "The limit must be zero or more" in refused.content.decode()
    assert client.post(f"/budgets/keys/{key.pk}/", {"action": "remove"}).status_code == 302
    assert not Budget.objects.filter(api_key=key).exists()
    assert not Budget.objects.filter(organization=org, api_key=None).exists()  # the organization's untouched


def test_members_without_the_role_get_403_and_change_nothing(client, owner, org):
    member = User.objects.create_user("budget-member@example.com", "pw-123456789")
    Membership.objects.create(organization=org, user=member, role=Role.MEMBER)
    key, _ = APIKey.objects.create_key(org, "mine", created_by=member)
    Budget.objects.create(organization=org, limit=Decimal("10"))
    login(client, member, org)
    assert client.get("/budgets/").status_code == 403
    assert client.post("/budgets/", {"org-limit": "1000"}).status_code == 403
    assert client.post("/budgets/", {"action": "remove"}).status_code == 403
    assert client.post(f"/budgets/keys/{key.pk}/", {f"key-{key.pk}-limit": "5"}).status_code == 403  # even their own key
    assert list(Budget.objects.values_list("api_key_id", "limit")) == [(None, Decimal("10"))]
    assert "Set or change budgets" not in client.get("/usage/").content.decode()


def test_another_organizations_key_is_a_404_and_its_budget_is_untouched(client, owner, org):
    other = create_organization(User.objects.create_user("budget-other2@example.com", "pw-123456789"), "Other")
    theirs, _ = APIKey.objects.create_key(other, "theirs")
    Budget.objects.create(organization=other, api_key=theirs, limit=Decimal("7"))
    login(client, owner, org)
    assert client.post(f"/budgets/keys/{theirs.pk}/", {f"key-{theirs.pk}-limit": "100"}).status_code == 404
    assert client.post(f"/budgets/keys/{theirs.pk}/", {"action": "remove"}).status_code == 404
    assert Budget.objects.get(api_key=theirs).limit == Decimal("7")
    page = client.get("/budgets/").content.decode()
    assert "theirs" not in page
    own, _ = APIKey.objects.create_key(org, "ours", created_by=owner)
    assert client.post(f"/budgets/keys/{own.pk}/", {f"key-{own.pk}-limit": "100"}).status_code == 302  # the route works


def test_a_limit_refused_below_a_fraction_of_a_cent_names_the_exact_floor():
    """Metered costs have 8 places: the refusal names what is spent to the digit, not rounded to a cent that
    would itself be refused ("cannot be lower than $4.00" when 4.00 is refused too)."""
    budget = Budget(limit=Decimal("10"), spent=Decimal("3.00030000"), reserved=Decimal("1"))
    assert budget.limit_refusal(Decimal("4.00")) == (
        "$3.0003 is already spent and $1.00 held by requests in flight: the limit cannot be lower than $4.0003.")
    assert budget.limit_refusal(Decimal("4.0003")) is None
    assert Budget().limit_refusal(Decimal("-0.01")) == "The limit must be zero or more (remove the budget for no limit)."
    assert Budget().limit_refusal(Decimal("0")) is None
