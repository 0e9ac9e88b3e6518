"""Money budgets on the real PostgreSQL: the worst-case cost held beside the tokens, settled to the
actual cost, refused honestly (used up: no retry; held by requests in flight: retryable), all or nothing
across the key's budget, the organization's and the entitlement, released by the expiry sweep, and never
overspent under concurrency."""

from __future__ import annotations

import datetime as dt
import threading
from decimal import Decimal

import pytest
from django.db import connections
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Organization
from inference import quotas
from inference.errors import GatewayError
from inference.models import AIModel, Budget, Reservation, UsageRecord
from inference.validation import parse_chat

CENT = Decimal("0.01")


@pytest.fixture
def org(db):
    return Organization.objects.create(name="Budget", slug=f"budget-{timezone.now().timestamp()}")


def grant(org, quota=None):
    return Entitlement.objects.create(organization=org, token_quota=quota)


def record(org, request_id: str, cost: Decimal) -> UsageRecord:
    return UsageRecord(organization=org, model_name="m", endpoint="chat/completions", prompt_tokens=10,
                       completion_tokens=5, cost=cost, status="ok", http_status=200, latency_ms=1.0,
                       request_id=request_id)


def fresh(*rows):
    for row in rows:
        row.refresh_from_db()
    return rows


def test_worst_cost_prices_the_completion_bound_at_the_output_rate():
    model = AIModel(name="priced", price_input_per_million=Decimal(1), price_output_per_million=Decimal(4))
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 2})
    # 1,000 held: 200 completion at $4/M, 800 prompt at $1/M
    assert quotas.worst_cost(model, chat, 1000) == Decimal("0.0016")
    dear_input = AIModel(name="d", price_input_per_million=Decimal(5), price_output_per_million=Decimal(1))
    assert quotas.worst_cost(dear_input, chat, 1000) == Decimal("0.005")  # every token could be prompt


def test_a_budget_holds_the_worst_case_and_settles_the_actual_cost(org):
    entitlement = grant(org)
    budget = Budget.objects.create(organization=org, limit=Decimal("1.00"))
    hold = quotas.reserve([entitlement], 100, "req_1", cost=Decimal("0.40"), budgets=[budget])
    (budget,) = fresh(budget)
    assert (budget.spent, budget.reserved) == (0, Decimal("0.40"))
    assert Reservation.objects.get().org_budget_id == budget.pk
    quotas.settle(hold, 50, record(org, "req_1", Decimal("0.15")))
    (budget,) = fresh(budget)
    assert (budget.spent, budget.reserved) == (Decimal("0.15"), 0)


def test_a_cost_above_the_hold_is_charged_at_the_hold(org):
    entitlement = grant(org)
    budget = Budget.objects.create(organization=org, limit=Decimal("1.00"))
    hold = quotas.reserve([entitlement], 100, "req_1", cost=Decimal("0.40"), budgets=[budget])
    quotas.settle(hold, 50, record(org, "req_1", Decimal("0.90")))
    (budget,) = fresh(budget)
    assert budget.spent == Decimal("0.40")


def test_refusals_tell_a_spent_budget_from_one_held_in_flight(org):
    entitlement = grant(org)
    budget = Budget.objects.create(organization=org, limit=Decimal("1.00"))
    first = quotas.reserve([entitlement], 10, "req_1", cost=Decimal("0.70"), budgets=[budget])
    with pytest.raises(GatewayError) as err:
        quotas.reserve([entitlement], 10, "req_2", cost=Decimal("0.50"), budgets=[budget])
    assert (err.value.status, err.value.code, err.value.headers["x-should-retry"]) == (429, "quota_in_flight", "true")
    quotas.settle(first, 10, record(org, "req_1", Decimal("0.70")))
    with pytest.raises(GatewayError) as err:
        quotas.reserve([entitlement], 10, "req_3", cost=Decimal("0.50"), budgets=[budget])
    assert (err.value.code, err.value.headers["x-should-retry"]) == ("insufficient_quota", "false")
    assert "organization's budget" in err.value.message and "$0.300000 of $1.00" in err.value.message
    (entitlement, budget) = fresh(entitlement, budget)
    assert (entitlement.tokens_reserved, budget.reserved) == (0, 0)  # the refused tries held nothing
    quotas.reserve([entitlement], 10, "req_4", cost=Decimal("0.30"), budgets=[budget])  # exactly what is left


def test_key_budget_organization_budget_and_entitlement_are_held_all_or_nothing(org):
    entitlement = grant(org, quota=100)
    key, _ = APIKey.objects.create_key(org, "k")
    key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
    org_budget = Budget.objects.create(organization=org, limit=Decimal("0.50"))
    budgets = [key_budget, org_budget]
    with pytest.raises(GatewayError) as err:  # the key's budget has room, the organization's does not
        quotas.reserve([entitlement], 10, "req_1", cost=Decimal("0.60"), budgets=budgets)
    assert err.value.code == "insufficient_quota" and "organization's budget" in err.value.message
    with pytest.raises(GatewayError) as err:  # both budgets have room, the entitlement does not
        quotas.reserve([entitlement], 101, "req_2", cost=Decimal("0.10"), budgets=budgets)
    assert err.value.code == "insufficient_quota" and "entitlement" in err.value.message
    key_budget, org_budget, entitlement = fresh(key_budget, org_budget, entitlement)
    assert (key_budget.reserved, org_budget.reserved, entitlement.tokens_reserved) == (0, 0, 0)
    hold = quotas.reserve([entitlement], 10, "req_3", cost=Decimal("0.20"), budgets=budgets)
    reservation = Reservation.objects.get()
    assert (reservation.key_budget_id, reservation.org_budget_id) == (key_budget.pk, org_budget.pk)
    quotas.settle(hold, 10, record(org, "req_3", Decimal("0.05")))
    key_budget, org_budget = fresh(key_budget, org_budget)
    assert (key_budget.spent, org_budget.spent, key_budget.reserved, org_budget.reserved) == (
        Decimal("0.05"), Decimal("0.05"), 0, 0)


def test_the_expiry_sweep_releases_budgets_and_a_late_settlement_charges_what_fits(org):
    entitlement = grant(org)
    budget = Budget.objects.create(organization=org, limit=Decimal("1.00"))
    late = quotas.reserve([entitlement], 10, "req_late", cost=Decimal("0.60"), budgets=[budget])
    Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert quotas.expire_reservations() == 1
    (budget,) = fresh(budget)
    assert budget.reserved == 0
    other = quotas.reserve([entitlement], 10, "req_other", cost=Decimal("0.70"), budgets=[budget])
    quotas.settle(late, 10, record(org, "req_late", Decimal("0.50")))  # 1.00 - 0.70 held: 0.30 fits
    (budget,) = fresh(budget)
    assert (budget.spent, budget.reserved) == (Decimal("0.30"), Decimal("0.70"))
    assert UsageRecord.objects.filter(request_id="req_late").exists()
    quotas.settle(other, 10, record(org, "req_other", Decimal("0.70")))
    (budget,) = fresh(budget)
    assert (budget.spent, budget.reserved) == (Decimal("1.00"), 0)


@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_never_exceed_the_budget():
    org = Organization.objects.create(name="Race", slug="budget-race")
    entitlement = grant(org)
    budget = Budget.objects.create(organization=org, limit=Decimal("1.00"))
    results = []
    barrier = threading.Barrier(12)

    def attempt(i):
        try:
            barrier.wait()
            results.append(quotas.reserve([entitlement], 10, f"req_{i}", cost=Decimal("0.25"), budgets=[budget]))
        except GatewayError as exc:
            results.append(exc.code)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    holds = [h for h in results if isinstance(h, quotas.Hold)]
    assert len(holds) == 4 and {r for r in results if r not in holds} == {"quota_in_flight"}
    (budget,) = fresh(budget)
    assert budget.reserved == Decimal("1.00")
    for i, hold in enumerate(holds):
        quotas.settle(hold, 10, record(org, f"req_done_{i}", Decimal("0.20")))
    (budget,) = fresh(budget)
    assert (budget.spent, budget.reserved) == (Decimal("0.80"), 0)


# Through the gateway process (uvicorn, the asyncio money path) in front of the stub upstream.

MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture
def priced_model(stub_upstream):
    from .conftest import add_model

    return add_model("budget-model", stub_upstream, price_input_per_million=1, price_output_per_million=2)


@pytest.mark.django_db(transaction=True)
@pytest.mark.slow
def test_the_gateway_refuses_a_request_its_budget_cannot_cover_and_settles_the_actual_cost(gateway, priced_model):
    import httpx
    import openai

    from tests.openapi_spec import validate_error

    from .conftest import make_tenant

    tenant = make_tenant()
    key_budget = Budget.objects.create(organization=tenant.organization, api_key=tenant.api_key,
                                       limit=Decimal("0.0003"))
    org_budget = Budget.objects.create(organization=tenant.organization, limit=Decimal("1.00"))
    body = {"model": "budget-model", "messages": MESSAGES, "max_tokens": 100}
    # no published tokenizer: held ~(bytes + 256) prompt tokens at $1/M + 100 completion at $2/M > $0.0003
    refused = httpx.post(f"{gateway}/v1/chat/completions", json=body, timeout=30,
                         headers={"authorization": f"Bearer {tenant.raw_key}"})
    assert refused.status_code == 429 and refused.headers["x-should-retry"] == "false"
    validate_error(refused.json())
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota" and "API key's budget" in error["message"]
    assert not UsageRecord.objects.filter(organization=tenant.organization).exists()

    key_budget.limit = Decimal("0.01")
    key_budget.save(update_fields=["limit"])
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0, timeout=30)
    answer = client.chat.completions.create(**body)
    row = UsageRecord.objects.get(organization=tenant.organization)
    assert row.cost == Decimal(answer.usage.prompt_tokens * 1 + answer.usage.completion_tokens * 2) / 10**6 > 0
    key_budget, org_budget = fresh(key_budget, org_budget)
    assert (key_budget.spent, org_budget.spent) == (row.cost, row.cost)
    assert (key_budget.reserved, org_budget.reserved) == (0, 0) and not Reservation.objects.exists()
