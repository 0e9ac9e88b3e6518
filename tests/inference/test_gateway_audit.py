"""A request through the real gateway process moves the entitlement's counters and the key's last-used
time, writes its usage record, and writes no audit-log row (accounts/audit.py: quiet fields, /v1/ skipped)."""

from __future__ import annotations

import openai
import pytest
from django.apps import apps

from accounts.models import APIKey, Entitlement
from inference.models import UsageRecord

from .conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EVENT_MODELS = [model for model in apps.get_models() if getattr(model, "pgh_tracked_model", None) is not None]


def audit_rows() -> dict[str, int]:
    return {model._meta.label: model.objects.count() for model in EVENT_MODELS}


def test_a_gateway_request_writes_no_audit_row(gateway, stub_upstream):
    add_model("audit-model", stub_upstream)
    tenant = make_tenant("audited")
    before = audit_rows()
    assert before["accounts.APIKeyEvent"] >= 1  # the tenant's own set-up was recorded
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)
    for _ in range(2):
        client.chat.completions.create(model="audit-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert UsageRecord.objects.filter(api_key=tenant.api_key).count() == 2
    assert Entitlement.objects.get(pk=tenant.entitlement.pk).tokens_used > 0
    assert APIKey.objects.get(pk=tenant.api_key.pk).last_used_at is not None
    assert audit_rows() == before
