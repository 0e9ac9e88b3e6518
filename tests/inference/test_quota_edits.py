"""An operator editing an entitlement while requests are in flight (real PostgreSQL): the quota cannot be
set below used + held, an edit never writes back stale usage counters, and a settlement after a quota was
lowered anyway still writes its usage record (the charge is cut to what the quota allows)."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Organization, User
from inference import quotas
from inference.models import UsageRecord

pytestmark = pytest.mark.django_db

ENTITLEMENTS = "/admin/accounts/entitlement/"


@pytest.fixture
def org():
    return Organization.objects.create(name="Edits", slug=f"edits-{timezone.now().timestamp()}")


@pytest.fixture
def admin_client(client):
    client.force_login(User.objects.create_superuser("root-edits@example.com", "pw-not-used-123"))
    return client


def edit(client, entitlement: Entitlement, **fields):
    data = {"token_quota": str(entitlement.token_quota), "model_names": "[]",
            "starts_at_0": entitlement.starts_at.strftime("%Y-%m-%d"),
            "starts_at_1": entitlement.starts_at.strftime("%H:%M:%S"), "ends_at_0": "", "ends_at_1": ""}
    data.update(fields)
    return client.post(f"{ENTITLEMENTS}{entitlement.pk}/change/", data)


def test_the_quota_cannot_go_below_used_plus_held(admin_client, org):
    entitlement = Entitlement.objects.create(organization=org, token_quota=1000)
    hold = quotas.reserve([entitlement], 300, "req_held")
    quotas.settle(quotas.reserve([entitlement], 200, "req_done"), 200, None)  # 200 used, 300 held
    response = edit(admin_client, entitlement, token_quota="499")
    assert response.status_code == 200  # the form again, with the error
    assert "200 tokens are used and 300 held by requests in flight" in response.content.decode()
    entitlement.refresh_from_db()
    assert entitlement.token_quota == 1000
    assert edit(admin_client, entitlement, token_quota="500").status_code == 302
    entitlement.refresh_from_db()
    assert (entitlement.token_quota, entitlement.tokens_used, entitlement.tokens_reserved) == (500, 200, 300)
    quotas.settle(hold, 300, None)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (500, 0)


@pytest.mark.django_db(transaction=True)
def test_an_edit_never_writes_back_stale_counters(admin_client, org, monkeypatch):
    """The gateway (another connection) moves the counters while the operator's POST is being handled,
    after the admin loaded the row and before it saves it; saving changes the model list only."""
    from accounts.admin_codes import EntitlementForm

    entitlement = Entitlement.objects.create(organization=org, token_quota=10_000)
    holds = []
    clean = EntitlementForm.clean

    def gateway_traffic():
        try:
            holds.append(quotas.reserve([entitlement], 700, "req_live"))
            quotas.settle(quotas.reserve([entitlement], 100, "req_quick"), 60, None)
        finally:
            connection.close()

    def clean_while_traffic_flows(form):
        worker = threading.Thread(target=gateway_traffic)
        worker.start()
        worker.join()
        return clean(form)

    monkeypatch.setattr(EntitlementForm, "clean", clean_while_traffic_flows)
    assert edit(admin_client, entitlement, model_names='["smollm2"]').status_code == 302
    entitlement.refresh_from_db()
    assert entitlement.model_names == ["smollm2"]
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (60, 700)
    quotas.settle(holds[0], 10, None)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (70, 0)


def test_a_settlement_after_the_quota_was_lowered_keeps_its_usage_record(org):
    entitlement = Entitlement.objects.create(organization=org, token_quota=1000)
    key, _ = APIKey.objects.create_key(org, "k")
    hold = quotas.reserve([entitlement], 600, "req_long")
    Entitlement.objects.filter(pk=entitlement.pk).update(token_quota=400)  # behind the form's back
    record = UsageRecord(organization=org, api_key=key, model_name="m", endpoint="chat/completions",
                         prompt_tokens=100, completion_tokens=450, status="ok", http_status=200, latency_ms=1.0,
                         request_id="req_long")
    quotas.settle(hold, 550, record, key)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (400, 0)  # cut to the quota
    row = UsageRecord.objects.get(request_id="req_long")
    assert (row.prompt_tokens, row.completion_tokens) == (100, 450)  # the full count stays on the record
