"""Money budgets on SQLite, the database of `make run`: the one money path (inference/quotas.py) driven on
Django's SQLite connection holds a request's worst-case cost on the key's and the organization's budgets,
settles the actual cost, refuses a request once a budget is spent (no retry), and the expiry sweep releases
an abandoned hold. It runs in a subprocess on embedded defaults (maas.settings, a fresh SQLite file): the
test suite's own database is PostgreSQL."""

from __future__ import annotations

import json
from decimal import Decimal

from tests.processes import sqlite_manage

SCRIPT = r'''
import datetime as dt, json
from decimal import Decimal
from django.db import connection
from django.utils import timezone
from accounts.models import APIKey, Entitlement, Organization
from inference import quotas
from inference.errors import GatewayError
from inference.models import Budget, Reservation, UsageRecord

org = Organization.objects.create(name="Lite", slug="lite")
entitlement = Entitlement.objects.create(organization=org, token_quota=1000)
key, _ = APIKey.objects.create_key(org, "k")
key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
org_budget = Budget.objects.create(organization=org, limit=Decimal("5.00"))
both = [key_budget, org_budget]
out = {"vendor": connection.vendor}

def record(request_id, cost):
    return UsageRecord(organization=org, api_key=key, model_name="m", endpoint="chat/completions", prompt_tokens=10,
                       completion_tokens=5, cost=cost, status="ok", http_status=200, latency_ms=1.0,
                       request_id=request_id)

def state():
    for row in (key_budget, org_budget, entitlement):
        row.refresh_from_db()
    return [str(key_budget.spent), str(key_budget.reserved), str(org_budget.spent), str(org_budget.reserved),
            entitlement.tokens_used, entitlement.tokens_reserved]

def refusal(cost, budgets):
    try:
        quotas.reserve([entitlement], 10, "refused", cost=Decimal(cost), budgets=budgets)
    except GatewayError as exc:
        return [exc.status, exc.code, exc.headers.get("x-should-retry"), exc.message]
    return None

hold = quotas.reserve([entitlement], 100, "req_1", cost=Decimal("0.40"), budgets=both)
out["held"] = state()
quotas.settle(hold, 50, record("req_1", Decimal("0.15")))
out["settled"] = state()
hold = quotas.reserve([entitlement], 10, "req_2", cost=Decimal("0.85"), budgets=both)
out["in_flight_refusal"] = refusal("0.01", both)
quotas.settle(hold, 10, record("req_2", Decimal("0.85")))
out["spent_up"] = state()
out["spent_refusal"] = refusal("0.01", both)
abandoned = quotas.reserve([entitlement], 20, "req_3", cost=Decimal("2.00"), budgets=[org_budget])
out["abandoned_held"] = state()
Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
out["swept"] = quotas.expire_reservations()
out["after_sweep"] = state()
out["reservations"] = Reservation.objects.count()
out["records"] = sorted(UsageRecord.objects.values_list("request_id", flat=True))
print("RESULT " + json.dumps(out))
'''


def test_budgets_hold_settle_refuse_and_sweep_on_sqlite(tmp_path):
    manage = sqlite_manage(tmp_path)

    manage("migrate", "--noinput")
    [line] = [line for line in manage("shell", "-c", SCRIPT).splitlines() if line.startswith("RESULT ")]
    out = json.loads(line.removeprefix("RESULT "))

    def money(row):  # key spent, key held, organization spent, organization held; tokens used, tokens held
        return [Decimal(v) for v in row[:4]] + row[4:]

    assert out["vendor"] == "sqlite"
    assert money(out["held"]) == [0, Decimal("0.40"), 0, Decimal("0.40"), 0, 100]  # the worst case, on both
    assert money(out["settled"]) == [Decimal("0.15"), 0, Decimal("0.15"), 0, 50, 0]  # the actual cost
    status, code, retry, _ = out["in_flight_refusal"]
    assert (status, code, retry) == (429, "quota_in_flight", "true")  # room held by a request in flight
    assert money(out["spent_up"]) == [Decimal("1.00"), 0, Decimal("1.00"), 0, 60, 0]
    status, code, retry, message = out["spent_refusal"]
    assert (status, code, retry) == (429, "insufficient_quota", "false") and "API key's budget" in message
    assert money(out["abandoned_held"]) == [Decimal("1.00"), 0, Decimal("1.00"), Decimal("2.00"), 60, 20]
    assert out["swept"] == 1
    assert money(out["after_sweep"]) == [Decimal("1.00"), 0, Decimal("1.00"), 0, 60, 0]  # released, not charged
    assert out["reservations"] == 0 and out["records"] == ["req_1", "req_2"]
