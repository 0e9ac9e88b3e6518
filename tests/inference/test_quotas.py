"""Quota reservations on the real PostgreSQL: the arithmetic, hold and settle, expiry of crashed
requests' holds, the admission query against EntitlementQuerySet.active, and concurrent holds."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from django.db import connections
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Organization
from inference import quotas
from inference.errors import GatewayError
from inference.models import Reservation, UsageRecord
from inference.validation import parse_chat, parse_completion

MESSAGES = [{"role": "user", "content": "héllo"}]  # 6 bytes of UTF-8


def test_reservation_arithmetic():
    chat = parse_chat({"model": "m", "messages": MESSAGES, "max_tokens": 10})
    # bytes of content + role + per-message overhead, then the template overhead and the completion
    assert chat.prompt_bound == 6 + 4 + 8
    assert chat.reservation(context_length=2048, overhead=256) == 18 + 256 + 10
    assert chat.reservation(context_length=100, overhead=256) == 100  # never more than the context
    unbounded = parse_chat({"model": "m", "messages": MESSAGES, "n": 3})
    assert unbounded.reservation(context_length=2048, overhead=256) == 3 * 2048
    two = parse_chat({"model": "m", "messages": MESSAGES, "max_completion_tokens": 10, "n": 2})
    assert two.reservation(context_length=2048, overhead=0) == 18 + 2 * 10
    legacy = parse_completion({"model": "m", "prompt": [1, 2, 3]})
    assert legacy.max_completion_tokens == 16  # OpenAI's default, the engine's too (one schema)
    assert legacy.reservation(context_length=2048, overhead=0) == 3 + 16


@pytest.fixture
def org(db):
    return Organization.objects.create(name="Quota", slug=f"quota-{timezone.now().timestamp()}")


def grant(org, quota, **fields):
    return Entitlement.objects.create(organization=org, token_quota=quota, **fields)


def test_hold_settle_and_refusal(org):
    entitlement = grant(org, 1000)
    hold = quotas.reserve([entitlement], 600, "req_a")
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (0, 600)
    with pytest.raises(GatewayError) as err:
        quotas.reserve([entitlement], 500, "req_b")  # 600 held + 500 > 1000
    assert (err.value.status, err.value.code) == (429, "insufficient_quota")
    assert err.value.headers["x-should-retry"] == "false"
    quotas.settle(hold, 120, None)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (120, 0)
    assert not Reservation.objects.exists()
    quotas.reserve([entitlement], 880, "req_c")  # exactly what is left


def test_usage_above_the_hold_is_charged_at_the_hold(org):
    entitlement = grant(org, 100)
    hold = quotas.reserve([entitlement], 100, "req_a")
    quotas.settle(hold, 150, None)
    entitlement.refresh_from_db()
    assert entitlement.tokens_used == 100 <= entitlement.token_quota


def test_settle_writes_the_usage_record_in_the_same_statement(org):
    entitlement = grant(org, None)
    key, _ = APIKey.objects.create_key(org, "k")
    hold = quotas.reserve([entitlement], 50, "req_rec")
    record = UsageRecord(organization=org, api_key=key, model_name="m", endpoint="chat/completions",
                         prompt_tokens=7, completion_tokens=3, status="ok", http_status=200, latency_ms=1.5,
                         request_id="req_rec")
    quotas.settle(hold, 10, record, key)
    row = UsageRecord.objects.get(request_id="req_rec")
    assert (row.prompt_tokens, row.completion_tokens, row.api_key_id) == (7, 3, key.pk)
    assert row.created_at is not None
    key.refresh_from_db()
    entitlement.refresh_from_db()
    assert key.last_used_at is not None and entitlement.tokens_used == 10


def test_next_covering_entitlement_and_unlimited(org):
    small, unlimited = grant(org, 10), grant(org, None)
    hold = quotas.reserve([small, unlimited], 50, "req_a")
    assert hold.entitlement_id == unlimited.pk
    revoked = grant(org, 10_000, revoked_at=timezone.now())
    with pytest.raises(GatewayError):
        quotas.reserve([revoked], 5, "req_b")  # the UPDATE re-checks revocation


def test_expired_holds_are_released_and_late_settlements_charge_what_fits(org):
    entitlement = grant(org, 1000)
    crashed = quotas.reserve([entitlement], 700, "req_crashed")
    late = quotas.reserve([entitlement], 200, "req_late")
    Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    assert quotas.expire_reservations() == 2
    assert quotas.expire_reservations() == 0
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == 0
    other = quotas.reserve([entitlement], 900, "req_new")  # the room came back
    quotas.settle(late, 200, None)  # its hold is gone: charged only what still fits (1000 - 900 held)
    entitlement.refresh_from_db()
    assert entitlement.tokens_used == 100 and entitlement.tokens_used + entitlement.tokens_reserved <= 1000
    quotas.settle(other, 900, None)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (1000, 0)
    assert crashed.tokens == 700


def test_admission_query_matches_entitlement_active_rule(org):
    now = timezone.now()
    hour = dt.timedelta(hours=1)
    grant(org, 1)
    grant(org, 2, starts_at=now + hour)
    grant(org, 3, ends_at=now - hour)
    grant(org, 4, ends_at=now + hour)
    grant(org, 5, revoked_at=now)
    key, raw = APIKey.objects.create_key(org, "k", allowed_models=["m"])
    caller = quotas.admit(raw)
    assert sorted(e.pk for e in caller.entitlements) == sorted(Entitlement.objects.for_org(org).active().values_list("pk", flat=True))
    assert sorted(e.token_quota for e in caller.entitlements) == [1, 4]
    assert caller.api_key.allowed_models == ["m"] and caller.api_key.organization.cache_salt == org.cache_salt


def test_admission_refusals(org):
    key, raw = APIKey.objects.create_key(org, "k")
    with pytest.raises(GatewayError) as err:
        quotas.admit(raw)
    assert (err.value.status, err.value.code) == (403, "authorization_required")
    grant(org, None)
    assert quotas.admit(raw).api_key.pk == key.pk
    for bad in [raw[:-1] + ("A" if raw[-1] != "A" else "B"), "sk-" + "0" * 16 + "-" + "x" * 40]:
        with pytest.raises(GatewayError) as err:
            quotas.admit(bad)
        assert err.value.status == 401
    key.revoke()
    with pytest.raises(GatewayError) as err:
        quotas.admit(raw)
    assert err.value.status == 401 and "revoked" in err.value.message
    _, expiring = APIKey.objects.create_key(org, "old", expires_at=timezone.now() - dt.timedelta(seconds=1))
    with pytest.raises(GatewayError) as err:
        quotas.admit(expiring)
    assert "expired" in err.value.message


@pytest.mark.django_db(transaction=True)
def test_concurrent_holds_never_exceed_the_quota():
    org = Organization.objects.create(name="Race", slug="race")
    entitlement = grant(org, 1000)
    results = []
    barrier = threading.Barrier(20)

    def attempt(i):
        try:
            barrier.wait()
            results.append(quotas.reserve([entitlement], 200, f"req_{i}"))
        except GatewayError:
            results.append(None)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    holds = [h for h in results if h is not None]
    assert len(holds) == 5
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == 1000 and Reservation.objects.count() == 5
    for hold in holds:
        quotas.settle(hold, 150, None)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (750, 0)
