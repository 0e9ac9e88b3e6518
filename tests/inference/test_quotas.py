"""Quota reservations on the real PostgreSQL: the arithmetic, hold and settle, expiry of crashed
requests' holds, the admission query against EntitlementQuerySet.active, and concurrent holds."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time

import pytest
from django.db import connections, transaction
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Organization
from inference import pgasync, quotas
from inference.catalog import catalog
from inference.errors import GatewayError
from inference.models import AIModel, Deployment, Reservation, UsageRecord
from inference.ratelimit import RateLimiter
from inference.validation import parse_chat, parse_completion

from .conftest import in_thread

MESSAGES = [{"role": "user", "content": "héllo"}]  # 6 bytes of UTF-8


def test_reservation_arithmetic():
    chat = parse_chat({"model": "m", "messages": MESSAGES, "max_tokens": 10})
    # uncounted: bytes of content + role + per-message overhead, then the template overhead and the completion
    assert chat.prompt_bound == 6 + 4 + 8
    assert chat.reservation(2048, None, overhead=256, default_max_tokens=4096) == 18 + 256 + 10
    assert chat.reservation(100, None, overhead=256, default_max_tokens=4096) == 100  # never more than the context
    assert chat.reservation(2048, 12, overhead=256, default_max_tokens=4096) == 12 + 10  # counted: exact
    assert chat.default_max_tokens is None  # max_tokens was given: nothing to add to the body
    unbounded = parse_chat({"model": "m", "messages": MESSAGES, "n": 3})
    assert unbounded.reservation(2048, None, overhead=256, default_max_tokens=4096) == 3 * 2048
    assert unbounded.default_max_tokens is None  # uncounted: the whole context, and the body unchanged
    assert unbounded.reservation(2048, 12, overhead=256, default_max_tokens=1000) == 12 + 3 * 1000
    assert unbounded.default_max_tokens == 1000  # sent to the engine as max_tokens
    assert unbounded.reservation(2048, 1500, overhead=256, default_max_tokens=1000) == 1500 + 3 * 548
    assert unbounded.default_max_tokens == 548  # what the context leaves
    whole = parse_chat({"model": "m", "messages": MESSAGES})
    assert whole.reservation(2048, 12, overhead=256, default_max_tokens=0) == 2048  # default off: the context
    two = parse_chat({"model": "m", "messages": MESSAGES, "max_completion_tokens": 10, "n": 2})
    assert two.reservation(2048, None, overhead=0, default_max_tokens=4096) == 18 + 2 * 10
    legacy = parse_completion({"model": "m", "prompt": [1, 2, 3]})
    assert legacy.max_completion_tokens == 16  # OpenAI's default, the engine's too (one schema)
    assert legacy.reservation(2048, None, overhead=0, default_max_tokens=4096) == 3 + 16


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
        quotas.reserve([entitlement], 500, "req_b")  # 600 held + 500 > 1000, but nothing is used yet
    assert (err.value.status, err.value.code) == (429, "quota_in_flight")  # the room is held, not spent
    assert err.value.headers["x-should-retry"] == "true" and err.value.headers["retry-after"] == "1"
    quotas.settle(hold, 120, None)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (120, 0)
    assert not Reservation.objects.exists()
    with pytest.raises(GatewayError) as err:
        quotas.reserve([entitlement], 881, "req_c")  # 120 used + 881 > 1000 with nothing in flight
    assert (err.value.status, err.value.code) == (429, "insufficient_quota")
    assert err.value.headers["x-should-retry"] == "false"
    quotas.reserve([entitlement], 880, "req_c")  # exactly what is left


def test_usage_above_the_hold_is_charged_at_the_hold(org, caplog):
    entitlement = grant(org, 100)
    hold = quotas.reserve([entitlement], 100, "req_a")
    with caplog.at_level("ERROR", logger="inference.quotas"):
        quotas.settle(hold, 150, None)
    assert caplog.messages == [
        f"usage 150 exceeded reservation 100 (entitlement {entitlement.pk}): charging the reservation"]
    entitlement.refresh_from_db()
    assert entitlement.tokens_used == 100 <= entitlement.token_quota
    caplog.clear()
    hold = quotas.reserve([grant(org, 100)], 100, "req_exact")
    with caplog.at_level("ERROR", logger="inference.quotas"):
        quotas.settle(hold, 100, None)  # usage equal to the hold is no error
    assert caplog.messages == []


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


def test_a_settlement_marks_the_key_used_at_most_once_a_minute(org, monkeypatch):
    """last_used_at is written when it is unset or more than a minute old: a busy key costs no write per
    request."""
    entitlement = grant(org, None)
    key, _ = APIKey.objects.create_key(org, "k")
    instant = timezone.now()
    monkeypatch.setattr(quotas.timezone, "now", lambda: instant)
    seen = []
    for last_used in (None, instant - dt.timedelta(minutes=1), instant - dt.timedelta(minutes=1, microseconds=1)):
        APIKey.objects.filter(pk=key.pk).update(last_used_at=last_used)
        key.refresh_from_db()
        quotas.settle(quotas.reserve([entitlement], 5, f"req_{len(seen)}"), 5, None, key)
        seen.append(APIKey.objects.get(pk=key.pk).last_used_at)
    assert seen == [instant, instant - dt.timedelta(minutes=1), instant]


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
    quotas.settle(crashed, 700, None)  # the crashed request reports after all: nothing fits any more
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (1000, 0)


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


@pytest.mark.django_db(transaction=True)
def test_the_sweep_skips_a_hold_settled_while_it_waited_for_its_lock_and_releases_the_next():
    """expire_reservations lists the expired holds, then locks each: a hold whose request settles while the
    sweep waits for its row lock is gone by then, and the sweep goes on to the next one (not stops)."""
    org = Organization.objects.create(name="Sweep", slug="sweep")
    entitlement = grant(org, 1000)
    holds = {h.reservation_id: h for h in (quotas.reserve([entitlement], 100, f"req_{i}") for i in range(3))}
    Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    first = list(Reservation.objects.filter(expires_at__lte=timezone.now()).values_list("pk", flat=True))[0]
    locked, done = threading.Event(), threading.Event()
    swept, waited = [], []

    def settle_while_the_sweep_waits():
        try:
            with transaction.atomic():
                Reservation.objects.select_for_update().get(pk=first)
                locked.set()
                deadline = time.monotonic() + 20
                with connections["default"].cursor() as cursor:
                    while time.monotonic() < deadline:  # until the sweep's backend waits for this row lock
                        cursor.execute("SELECT pg_stat_clear_snapshot()")  # else one snapshot per transaction
                        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                       " AND datname = current_database()")
                        if cursor.fetchone()[0]:
                            waited.append(True)
                            break
                        time.sleep(0.02)
                quotas.settle(holds[first], 40, None)
        finally:
            connections.close_all()
            done.set()

    def sweep():
        try:
            locked.wait(10)
            swept.append(quotas.expire_reservations())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=settle_while_the_sweep_waits), threading.Thread(target=sweep)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert done.is_set() and waited, "the sweep never waited for the lock"
    assert swept == [2]
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (40, 0) and not Reservation.objects.exists()


def usage_record(org, key, request_id: str) -> UsageRecord:
    return UsageRecord(organization=org, api_key=key, model_name="m", endpoint="chat/completions",
                       prompt_tokens=100, completion_tokens=200, status="ok", http_status=200, latency_ms=1.0,
                       request_id=request_id)


def expire_all_holds():
    Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    quotas.expire_reservations()


def test_a_late_settlement_with_its_record_charges_what_fits(org):
    """The one-statement PostgreSQL settle (hold and record): a hold that already expired is still charged."""
    entitlement = grant(org, 1000)
    key, _ = APIKey.objects.create_key(org, "k")
    late = quotas.reserve([entitlement], 300, "req_late")
    expire_all_holds()
    other = quotas.reserve([entitlement], 800, "req_other")
    quotas.settle(late, 300, usage_record(org, key, "req_late"), key)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (200, 800)  # 1000 - 800 held
    assert UsageRecord.objects.filter(request_id="req_late").exists()
    quotas.settle(other, 800, usage_record(org, key, "req_other"), key)
    entitlement.refresh_from_db()
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (1000, 0)


@pytest.fixture
async def async_pool_closed():
    """The event-loop path opens its own pool to the test database: closed after the test."""
    yield
    for pool in list(pgasync._pools.values()):
        await pool.close()
    pgasync._pools.clear()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_a_late_settlement_on_the_event_loop_charges_what_fits():
    """settle_async (the gateway's path on PostgreSQL) after the hold expired: charged in a worker thread."""
    def setup():
        org = Organization.objects.create(name="Late", slug="late-async")
        entitlement = grant(org, 1000)
        key, _ = APIKey.objects.create_key(org, "k")
        late = quotas.reserve([entitlement], 300, "req_late_async")
        expire_all_holds()
        quotas.reserve([entitlement], 900, "req_other_async")
        return org, entitlement, key, late

    org, entitlement, key, late = await in_thread(setup)
    await quotas.settle_async(late, 300, usage_record(org, key, "req_late_async"), key)

    def check():
        entitlement.refresh_from_db()
        assert (entitlement.tokens_used, entitlement.tokens_reserved) == (100, 900)
        assert UsageRecord.objects.filter(request_id="req_late_async").exists()

    await in_thread(check)


def test_bounded_grants_ending_soonest_pay_first_unlimited_last(org):
    now = timezone.now()
    unlimited = grant(org, None)
    open_ended = grant(org, 1000)
    later = grant(org, 1000, ends_at=now + dt.timedelta(days=2))
    sooner = grant(org, 1000, ends_at=now + dt.timedelta(days=1))
    AIModel.objects.create(name="order-model")
    catalog.invalidate()
    _, raw = APIKey.objects.create_key(org, "k")
    _, covering = quotas.admit(raw).resolve("order-model")
    assert [e.pk for e in covering] == [sooner.pk, later.pk, open_ended.pk, unlimited.pk]
    assert quotas.reserve(covering, 600, "req_1").entitlement_id == sooner.pk
    assert quotas.reserve(covering, 600, "req_2").entitlement_id == later.pk  # 400 left on the first


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_a_refused_hold_on_the_event_loop_gives_back_the_concurrency_slot():
    def setup():
        org = Organization.objects.create(name="Slot", slug="slot-async", max_concurrent_requests=1)
        grant(org, 1000)
        model = AIModel.objects.create(name="slot-model")
        Deployment.objects.create(model=model, base_url="http://127.0.0.1:9")
        catalog.invalidate()
        return APIKey.objects.create_key(org, "k")[1]

    raw = await in_thread(setup)
    limiter = RateLimiter("", "refuse", 0.5)
    body = {"model": "slot-model", "messages": MESSAGES, "max_tokens": 2000}
    with pytest.raises(GatewayError) as err:
        await quotas.admit_request_async(raw, parse_chat(body), None, "req_refused_async", limiter)
    # the refusal's own headers and the rate limiter's, merged
    assert (err.value.code, err.value.headers["x-should-retry"]) == ("insufficient_quota", "false")
    assert err.value.headers["x-ratelimit-limit-requests"]
    admitted = await quotas.admit_request_async(raw, parse_chat({**body, "max_tokens": 1}), None, "req_fits_async",
                                                limiter)
    assert admitted.decision.allowed


def test_a_refused_key_is_named_by_its_first_seven_and_last_four_characters_only(db):
    assert quotas.redact("abcdefghijkl") == "…"  # 12 characters: too short to show any part
    assert quotas.redact("abcdefghijklm") == "abcdefg…jklm"
    assert quotas.redact("abcdefghijklmn") == "abcdefg…klmn"
    bad = "sk-" + "0" * 16 + "-" + "x" * 36 + "WXYZ"
    with pytest.raises(GatewayError) as err:
        quotas.admit(bad)
    assert err.value.message == "Incorrect API key provided: sk-0000…WXYZ."


def test_work_submitted_by_a_key_is_admitted_again_as_that_key(org):
    key, _ = APIKey.objects.create_key(org, "batch")
    credential = quotas.KeyCredential(key.pk)
    with pytest.raises(GatewayError) as err:
        quotas.admit_credential(credential)
    assert (err.value.status, err.value.code) == (403, "authorization_required")
    entitlement = grant(org, 100)
    caller = quotas.admit_credential(credential)
    assert (caller.api_key.pk, caller.source, [e.pk for e in caller.entitlements]) == (key.pk, "batch", [entitlement.pk])
    key.revoke()
    for gone in [credential, quotas.KeyCredential(key.pk + 10_000)]:
        with pytest.raises(GatewayError) as err:
            quotas.admit_credential(gone)
        assert err.value.status == 401 and err.value.message == "The API key that submitted this work is no longer usable."


def test_a_console_session_is_admitted_for_its_organization(org):
    from django.contrib.auth import get_user_model

    from accounts.models import Membership

    user = get_user_model().objects.create_user(f"u{org.pk}@example.com", "pw-long-enough-1")
    credential = quotas.SessionCredential(user.pk, org.pk)
    with pytest.raises(GatewayError) as err:
        quotas.admit_credential(credential)
    assert (err.value.status, err.value.code) == (401, "invalid_session")
    Membership.objects.create(organization=org, user=user)
    with pytest.raises(GatewayError) as err:
        quotas.admit_credential(credential)
    assert (err.value.status, err.value.code) == (403, "authorization_required")
    entitlement = grant(org, None)
    caller = quotas.admit_credential(credential)
    assert (caller.api_key, caller.organization.pk, caller.user_id, [e.pk for e in caller.entitlements]) == (
        None, org.pk, user.pk, [entitlement.pk])
    org.is_active = False
    org.save()
    with pytest.raises(GatewayError) as err:
        quotas.admit_credential(credential)
    assert err.value.status == 403 and err.value.message == "This organization is disabled."
    org.is_active = True
    org.save()
    user.is_active = False
    user.save()
    with pytest.raises(GatewayError) as err:
        quotas.admit_credential(credential)
    assert err.value.status == 401


def test_the_worst_cost_of_a_hold_prices_at_most_n_times_max_tokens_at_the_output_rate():
    from decimal import Decimal

    model = AIModel(name="priced", price_input_per_million=Decimal(1), price_output_per_million=Decimal(4))
    chat = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100, "n": 3})
    assert quotas.worst_cost(model, chat, 1000) == Decimal("0.0019")  # 300 at $4/M, 700 at $1/M
    assert quotas.worst_cost(model, chat, 250) == Decimal("0.001")  # fewer held than the bound: all output
    unbounded = parse_chat({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert quotas.worst_cost(model, unbounded, 1000) == Decimal("0.004")  # no bound: every token could be output
    dear_input = AIModel(name="d", price_input_per_million=Decimal(5), price_output_per_million=Decimal(1))
    assert quotas.worst_cost(dear_input, chat, 1000) == Decimal("0.005")


def test_the_models_a_caller_may_call_are_listed_by_name_skipping_the_ones_it_may_not():
    """Caller.visible_models (GET /v1/models): every entry `resolve` admits, in name order, and none it refuses,
    whichever name the refused ones sort between."""
    from inference.catalog import CatalogEntry

    org = Organization(pk=7, name="Seen", slug="seen")

    def entry(name, visible_to=None):
        return CatalogEntry(AIModel(name=name), visible_to, ())

    entries = {name: entry(name) for name in ["zeta", "alpha", "mid"]}
    entries["hidden"] = entry("hidden", frozenset({8}))  # listed for another organization only
    entries["beta"] = entry("beta", frozenset({7}))  # listed for this one
    entries["aaa-uncovered"] = entry("aaa-uncovered")  # no entitlement covers it
    grants = [Entitlement(token_quota=None, model_names=["zeta", "alpha", "mid", "hidden", "beta", "notinthecatalog"])]
    caller = quotas.Caller(None, grants, entries, organization=org)
    assert [e.model.name for e in caller.visible_models()] == ["alpha", "beta", "mid", "zeta"]
    key = APIKey(organization=org, allowed_models=["mid", "beta"])
    keyed = quotas.Caller(key, grants, entries, user_id=1)
    assert [e.model.name for e in keyed.visible_models()] == ["beta", "mid"]
    assert quotas.Caller(None, [], entries, organization=org).visible_models() == []


async def test_waiters_for_quota_room_wake_one_per_settlement_in_arrival_order():
    """RoomFreed: a settlement wakes the longest waiter only; a wait that runs out returns quietly and
    leaves no waiter behind to swallow the next settlement's wake-up."""
    import asyncio

    room = quotas.RoomFreed()
    started = asyncio.get_running_loop().time()
    await room.wait(0.05)  # nobody settles: returns after the timeout, no error
    assert asyncio.get_running_loop().time() - started >= 0.04
    assert not room._waiters
    woken = []

    async def waiter(name, timeout):
        await room.wait(timeout)
        woken.append(name)

    first = asyncio.create_task(waiter("first", 30))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second", 30))
    await asyncio.sleep(0)
    room.notify()
    await asyncio.wait_for(first, 5)
    await asyncio.sleep(0.01)
    assert woken == ["first"] and not second.done()
    room.notify()
    await asyncio.wait_for(second, 5)
    assert woken == ["first", "second"] and not room._waiters
    room.notify()  # nobody waits: nothing to wake, nothing kept for later
    await room.wait(0.01)
    assert not room._waiters


def test_a_live_requests_hold_is_pushed_a_full_ttl_ahead_and_survives_the_sweep(org, settings):
    """extend_hold: the expiry moves to now + GATEWAY_RESERVATION_TTL_SECONDS, of this hold only."""
    settings.GATEWAY_RESERVATION_TTL_SECONDS = 600
    entitlement = grant(org, 1000)
    live = quotas.reserve([entitlement], 100, "req_live")
    crashed = quotas.reserve([entitlement], 200, "req_crashed")
    Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    before = timezone.now()
    quotas.extend_hold(live)
    after = timezone.now()
    expires_at = Reservation.objects.get(pk=live.reservation_id).expires_at
    assert before + dt.timedelta(seconds=600) <= expires_at <= after + dt.timedelta(seconds=600)
    assert Reservation.objects.get(pk=crashed.reservation_id).expires_at < before
    assert quotas.expire_reservations() == 1
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == 100 and Reservation.objects.get().pk == live.reservation_id


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_a_live_requests_hold_is_extended_on_the_event_loop(settings):
    settings.GATEWAY_RESERVATION_TTL_SECONDS = 600

    def setup():
        org = Organization.objects.create(name="Extend", slug="extend-async")
        entitlement = grant(org, 1000)
        hold = quotas.reserve([entitlement], 100, "req_extend_async")
        Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
        return hold

    hold = await in_thread(setup)
    before = timezone.now()
    await quotas.extend_hold_async(hold)
    after = timezone.now()

    def check():
        expires_at = Reservation.objects.get(pk=hold.reservation_id).expires_at
        assert before + dt.timedelta(seconds=600) <= expires_at <= after + dt.timedelta(seconds=600)
        assert quotas.expire_reservations() == 0

    await in_thread(check)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_budgets_held_for_an_entitlement_without_room_are_given_back_on_the_event_loop():
    """reserve_async: both budgets fit, the entitlement no longer does (used meanwhile by a request the
    admission snapshot had not seen), so the budgets held are released (a statement that answers no rows, on
    the asyncio pool) and the refusal is the quota's 429, not a server error."""
    from decimal import Decimal

    from inference.models import Budget

    def setup():
        org = Organization.objects.create(name="Give back", slug="give-back-async")
        entitlement = grant(org, 100)
        key, _ = APIKey.objects.create_key(org, "k")
        budgets = [Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00")),
                   Budget.objects.create(organization=org, limit=Decimal("1.00"))]
        Entitlement.objects.filter(pk=entitlement.pk).update(tokens_used=50)  # the snapshot still says 0
        return entitlement, budgets

    entitlement, budgets = await in_thread(setup)
    with pytest.raises(GatewayError) as err:
        await quotas.reserve_async([entitlement], 60, "req_too_big", Decimal("0.10"), budgets)
    assert (err.value.status, err.value.code) == (429, "insufficient_quota")

    def check():
        assert [b.reserved for b in Budget.objects.order_by("pk")] == [0, 0]
        entitlement.refresh_from_db()
        assert entitlement.tokens_reserved == 0 and not Reservation.objects.exists()

    await in_thread(check)


def test_a_session_is_admitted_only_for_an_organization_its_user_belongs_to(org):
    """admit_session matches the membership on both the user and the organization: a member of another
    organization, or another member of this one, is no session for it. The playground's caller carries
    the organization's budget only (no key's) and the catalog."""
    from decimal import Decimal

    from django.contrib.auth import get_user_model

    from accounts.models import Membership
    from inference.models import Budget

    users = get_user_model().objects
    member = users.create_user(f"member{org.pk}@example.com", "pw-long-enough-1")
    outsider = users.create_user(f"outsider{org.pk}@example.com", "pw-long-enough-1")
    other_org = Organization.objects.create(name="Other", slug=f"other-{org.slug}")
    Membership.objects.create(organization=org, user=member)
    Membership.objects.create(organization=other_org, user=outsider)
    grant(org, None)
    grant(other_org, None)
    for credential in [quotas.SessionCredential(outsider.pk, org.pk), quotas.SessionCredential(member.pk, other_org.pk)]:
        with pytest.raises(GatewayError) as err:
            quotas.admit_credential(credential)
        assert (err.value.status, err.value.code, err.value.message) == (
            401, "invalid_session", "Your console session is no longer valid for this organization. Log in again.")
    key, _ = APIKey.objects.create_key(org, "k")
    Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))  # a key's: not the playground's
    org_budget = Budget.objects.create(organization=org, limit=Decimal("2.00"))
    Budget.objects.create(organization=other_org, limit=Decimal("3.00"))
    AIModel.objects.create(name="session-model")
    catalog.invalidate()
    caller = quotas.admit_credential(quotas.SessionCredential(member.pk, org.pk))
    assert (caller.source, [b.pk for b in caller.budgets]) == ("playground", [org_budget.pk])
    assert caller.resolve("session-model")[0].model.name == "session-model"
    org.is_active = False
    org.save()
    with pytest.raises(GatewayError) as err:
        quotas.admit_credential(quotas.SessionCredential(member.pk, org.pk))
    assert (err.value.status, err.value.type, err.value.code) == (403, "permission_denied", "organization_disabled")


def test_the_console_caller_reads_the_catalog_only_when_not_handed_one(org):
    """organization_caller: the entries it is given, else the catalog's."""
    grant(org, None)
    AIModel.objects.create(name="console-model")
    catalog.invalidate()
    given = {}
    assert quotas.organization_caller(org, None, entries=given).entries is given
    assert "console-model" in quotas.organization_caller(org, None).entries


def test_a_key_is_admitted_with_its_own_budget_first_then_its_organizations(org):
    """budgets_of, through every key admission (raw key, KeyCredential): the key's budget, then the
    organization's; never another key's or another organization's. Holds take them in that order."""
    from decimal import Decimal

    from inference.models import Budget

    grant(org, None)
    AIModel.objects.create(name="budget-order-model")
    catalog.invalidate()
    key, raw = APIKey.objects.create_key(org, "k")
    other_key, _ = APIKey.objects.create_key(org, "other")
    assert quotas.admit_credential(raw).budgets == [] and quotas.admit_credential(quotas.KeyCredential(key.pk)).budgets == []
    org_budget = Budget.objects.create(organization=org, limit=Decimal("2.00"))  # created first: sorts first by id
    Budget.objects.create(organization=org, api_key=other_key, limit=Decimal("4.00"))
    elsewhere = Organization.objects.create(name="Elsewhere", slug=f"elsewhere-{org.slug}")
    Budget.objects.create(organization=elsewhere, limit=Decimal("5.00"))
    key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
    for credential in [raw, quotas.KeyCredential(key.pk)]:
        caller = quotas.admit_credential(credential)
        assert [b.pk for b in caller.budgets] == [key_budget.pk, org_budget.pk]
        assert caller.resolve("budget-order-model")[0].model.name == "budget-order-model"
    assert [b.pk for b in quotas.budgets_of(other_key)][1:] == [org_budget.pk]


def test_the_expiry_sweep_releases_each_budget_a_hold_took_and_says_how_many_it_released(org, caplog):
    from decimal import Decimal

    from inference.models import Budget

    entitlement = grant(org, 1000)
    key, _ = APIKey.objects.create_key(org, "k")
    key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
    org_budget = Budget.objects.create(organization=org, limit=Decimal("2.00"))
    quotas.reserve([entitlement], 100, "req_both", cost=Decimal("0.30"), budgets=[key_budget, org_budget])
    quotas.reserve([entitlement], 50, "req_org", cost=Decimal("0.20"), budgets=[org_budget])
    kept = quotas.reserve([entitlement], 10, "req_kept", cost=Decimal("0.05"), budgets=[key_budget, org_budget])
    Reservation.objects.exclude(pk=kept.reservation_id).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with caplog.at_level("WARNING", logger="inference.quotas"):
        assert quotas.expire_reservations() == 2
    assert "released 2 expired token reservations" in caplog.messages
    for row in (key_budget, org_budget, entitlement):
        row.refresh_from_db()
    assert (key_budget.reserved, org_budget.reserved, entitlement.tokens_reserved) == (Decimal("0.05"), Decimal("0.05"), 10)


def served_model(name: str, **fields) -> AIModel:
    """A model with one replica nothing listens on (admission never calls it; its tokenizer fetch fails fast)."""
    model = AIModel.objects.create(name=name, **fields)
    Deployment.objects.create(model=model, base_url="http://127.0.0.1:9")
    catalog.invalidate()
    return model


def test_a_line_admitted_in_a_thread_holds_its_tokens_and_any_failure_gives_back_its_slot(org):
    """admit_request (the batch runner's path): the blocking limiter, then the hold; a refused hold, and a
    failure that is no refusal (a request id the reservation's column refuses), give the concurrency slot
    back; the refusal carries the rate-limit headers; `labels` learn the organization and the model."""
    from django.db import DataError, transaction

    org.max_concurrent_requests = 1
    org.save()
    entitlement = grant(org, 1000)
    served_model("line-model")
    key, _ = APIKey.objects.create_key(org, "batch")
    credential = quotas.KeyCredential(key.pk)
    limiter = RateLimiter("", "refuse", 0.5)
    body = {"model": "line-model", "messages": MESSAGES, "max_tokens": 2000}
    labels = {}
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(credential, parse_chat(body), None, "req_refused", limiter, labels)
    assert (err.value.code, err.value.headers["x-should-retry"]) == ("insufficient_quota", "false")
    assert err.value.headers["x-ratelimit-limit-requests"]
    assert labels == {"organization": org.slug, "model": "line-model"}
    small = {**body, "max_tokens": 10}
    with pytest.raises(DataError), transaction.atomic():
        quotas.admit_request(credential, parse_chat(small), None, "r" * 65, limiter)
    admitted = quotas.admit_request(credential, parse_chat(small), None, "req_fits", limiter)
    assert admitted.decision.allowed and admitted.caller.source == "batch"
    assert (admitted.entry.model.name, admitted.upstream.base_url) == ("line-model", "http://127.0.0.1:9")
    assert (admitted.hold.tokens, admitted.hold.entitlement_id) == (18 + 256 + 10, entitlement.pk)  # uncounted
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == admitted.hold.tokens
    with pytest.raises(GatewayError) as err:  # the one slot is the admitted line's: no hold is tried
        quotas.admit_request(credential, parse_chat(small), None, "req_second", limiter)
    assert (err.value.status, err.value.code, err.value.type) == (429, "rate_limit_exceeded", "concurrency")
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == admitted.hold.tokens and Reservation.objects.count() == 1


def test_admission_refuses_a_bad_body_an_endpoint_the_model_does_not_serve_and_a_model_without_replica(org):
    """_route, after authentication and before any limit: the body's own error, 400 for no body, 400
    model_not_supported on `model`, 503 without a replica; nothing is held for any of them."""
    grant(org, 1000)
    served_model("embedder", kind="embeddings")
    AIModel.objects.create(name="no-replica")
    catalog.invalidate()
    _, raw = APIKey.objects.create_key(org, "k")
    limiter = RateLimiter("", "refuse", 0.5)
    bad_body = GatewayError(400, "messages is required", param="messages")
    labels = {}
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(raw, None, bad_body, "req_1", limiter, labels)
    assert err.value is bad_body and labels == {"organization": org.slug}
    with pytest.raises(GatewayError) as err:  # the body's error wins over what could be parsed of it
        quotas.admit_request(raw, parse_chat({"model": "no-replica", "messages": MESSAGES}), bad_body, "req_1", limiter)
    assert err.value is bad_body
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(raw, None, None, "req_2", limiter)
    assert (err.value.status, err.value.message) == (400, "Invalid request.")
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(raw, parse_chat({"model": "embedder", "messages": MESSAGES}), None, "req_3", limiter)
    assert (err.value.status, err.value.type, err.value.code, err.value.param) == (
        400, "invalid_request_error", "model_not_supported", "model")
    assert "embeddings model" in err.value.message
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(raw, parse_chat({"model": "no-replica", "messages": MESSAGES}), None, "req_4", limiter)
    assert (err.value.status, err.value.code, err.value.message) == (
        503, "service_unavailable",
        "The model `no-replica` is temporarily unavailable: no healthy replica. Please retry.")
    assert not Reservation.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_a_settlement_on_the_event_loop_marks_the_key_used():
    def setup():
        org = Organization.objects.create(name="Touch", slug="touch-async")
        entitlement = grant(org, 1000)
        key, _ = APIKey.objects.create_key(org, "k")
        return org, key, quotas.reserve([entitlement], 100, "req_touch_async")

    org, key, hold = await in_thread(setup)
    await quotas.settle_async(hold, 10, usage_record(org, key, "req_touch_async"), key)

    def check():
        key.refresh_from_db()
        assert key.last_used_at is not None

    await in_thread(check)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_a_hold_on_the_event_loop_waits_for_room_a_settlement_frees_then_gives_up(settings, monkeypatch):
    """reserve_async on PostgreSQL: a hold held back only by requests in flight waits (up to
    GATEWAY_QUOTA_WAIT_SECONDS) and is taken once one settles; with nobody settling, the retryable 429."""
    import asyncio

    settings.GATEWAY_QUOTA_WAIT_SECONDS = 20
    monkeypatch.setattr(quotas, "QUOTA_RETRY_SECONDS", 15)  # woken by the settlement, not by a retry

    def setup():
        org = Organization.objects.create(name="Wait", slug="wait-async")
        entitlement = grant(org, 1000)
        return entitlement, quotas.reserve([entitlement], 600, "req_first")

    entitlement, first = await in_thread(setup)
    waiting = asyncio.create_task(quotas.reserve_async([entitlement], 500, "req_waiting"))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await quotas.settle_async(first, 100, None)
    hold = await asyncio.wait_for(waiting, 5)
    assert (hold.tokens, hold.entitlement_id) == (500, entitlement.pk)
    settings.GATEWAY_QUOTA_WAIT_SECONDS = 0.2
    started = asyncio.get_running_loop().time()
    with pytest.raises(GatewayError) as err:
        await quotas.reserve_async([entitlement], 500, "req_gives_up")
    assert err.value.code == "quota_in_flight" and asyncio.get_running_loop().time() - started >= 0.2


def member_with_key(slug: str):
    """An organization with an unlimited grant, a member and a key: (organization, user, key, raw key)."""
    from django.contrib.auth import get_user_model

    from accounts.models import Membership

    org = Organization.objects.create(name=slug, slug=slug)
    user = get_user_model().objects.create_user(f"{slug}@example.com", "pw-long-enough-1")
    Membership.objects.create(organization=org, user=user)
    grant(org, None)
    key, raw = APIKey.objects.create_key(org, "k")
    return org, user, key, raw


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_a_console_session_is_admitted_on_the_event_loop():
    """admit_credential_async: a session credential in a database thread, a raw key on the loop."""
    org, user, key, raw = await in_thread(lambda: member_with_key("loop-session"))
    caller = await quotas.admit_credential_async(quotas.SessionCredential(user.pk, org.pk))
    assert (caller.api_key, caller.organization.pk, caller.user_id, caller.source) == (None, org.pk, user.pk, "playground")
    assert (await quotas.admit_credential_async(raw)).api_key.pk == key.pk


@pytest.fixture
def on_sqlite(tmp_path, monkeypatch, django_db_blocker):
    """Run a function on SQLite (the database of `make run`), in this process: in a thread of its own whose
    default connection is a fresh SQLite file with the money tables, so quotas' SQLite statements run as
    they do there. `pgasync.vendor` is cached for the process (PostgreSQL here), so it is made to read the
    calling thread's connection instead; nothing else is replaced."""
    from django.db.backends.sqlite3.base import DatabaseWrapper

    from inference.models import AIModel, Budget, Deployment, ModelFallback

    monkeypatch.setattr(pgasync, "vendor", lambda: connections["default"].vendor)

    def run(fn):
        outcome = {}

        def body():
            with django_db_blocker.unblock():
                lite = DatabaseWrapper({**connections["default"].settings_dict, "ENGINE": "django.db.backends.sqlite3",
                                        "NAME": str(tmp_path / "money.sqlite3"), "OPTIONS": {}, "TEST": {}},
                                       alias="default")
                connections["default"] = lite
                try:
                    with lite.schema_editor() as editor:
                        for model in (Organization, APIKey, Entitlement, Budget, Reservation, UsageRecord,
                                      AIModel, ModelFallback, Deployment):
                            editor.create_model(model)
                    with lite.cursor() as cursor:  # the tables they point to are not made here
                        cursor.execute("PRAGMA foreign_keys = OFF")
                    outcome["value"] = fn()
                except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
                    outcome["error"] = exc
                finally:
                    lite.close()

        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    return run


def test_holds_on_sqlite_take_every_budget_and_the_entitlement_or_nothing(on_sqlite):
    """hold_statements' SQLite text: the first UPDATE checks every row, the next follow it; a hold that does
    not fit anywhere leaves every row as it was."""
    from decimal import Decimal

    from inference.models import Budget

    def scenario():
        org = Organization.objects.create(name="Lite", slug="lite")
        entitlement = grant(org, 1000)
        key, _ = APIKey.objects.create_key(org, "k")
        key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
        org_budget = Budget.objects.create(organization=org, limit=Decimal("0.50"))
        both = [key_budget, org_budget]

        def state():
            return [*(Budget.objects.get(pk=b.pk).reserved for b in both),
                    Entitlement.objects.get(pk=entitlement.pk).tokens_reserved, Reservation.objects.count()]

        def refusal(tokens, cost, budgets):
            try:
                quotas.reserve([entitlement], tokens, "refused", cost=Decimal(cost), budgets=budgets)
            except GatewayError as exc:
                return exc.code
            return "held"

        hold = quotas.reserve([entitlement], 100, "req_1", cost=Decimal("0.40"), budgets=both)
        reservation = Reservation.objects.get()
        out = {"hold": (hold.tokens, hold.cost, hold.budget_ids, hold.entitlement_id == entitlement.pk,
                        hold.reservation_id == reservation.pk),
               "reservation": (reservation.tokens, reservation.cost, reservation.key_budget_id == key_budget.pk,
                               reservation.org_budget_id == org_budget.pk, reservation.request_id),
               "held": state()}
        out["org_budget_full"] = refusal(10, "0.11", both), state()  # 0.40 + 0.11 > 0.50: the key's not taken
        out["key_budget_full"] = refusal(10, "0.61", [key_budget]), state()
        out["entitlement_full"] = refusal(901, "0.01", both), state()
        out["exactly_what_is_left"] = refusal(900, "0.10", both), state()
        Entitlement.objects.filter(pk=entitlement.pk).update(revoked_at=timezone.now())
        out["revoked"] = refusal(1, "0", []), state()
        return out, [key_budget.pk, org_budget.pk]

    out, budget_ids = on_sqlite(scenario)
    held = [Decimal("0.40"), Decimal("0.40"), 100, 1]
    assert out["hold"] == (100, Decimal("0.40"), tuple(budget_ids), True, True)
    assert out["reservation"] == (100, Decimal("0.40"), True, True, "req_1")
    assert out["held"] == held
    assert out["org_budget_full"] == ("quota_in_flight", held)
    assert out["key_budget_full"] == ("quota_in_flight", held)
    assert out["entitlement_full"] == ("quota_in_flight", held)
    assert out["exactly_what_is_left"] == ("held", [Decimal("0.50"), Decimal("0.50"), 1000, 2])
    assert out["revoked"] == ("insufficient_quota", [Decimal("0.50"), Decimal("0.50"), 1000, 2])


def test_on_sqlite_an_entitlement_used_up_meanwhile_is_the_quotas_refusal_and_the_next_one_pays(on_sqlite):
    """A refused SQLite hold holds nothing, yet it tells a refusal by the entitlement from one by a budget,
    as PostgreSQL does: with budgets that have room, an entitlement used up since the admission snapshot is
    `insufficient_quota` (it was the retryable `quota_in_flight`), and a second entitlement that covers the
    request is tried and pays (it never was)."""
    from decimal import Decimal

    from inference.models import Budget

    def scenario():
        org = Organization.objects.create(name="Lite", slug="lite")
        stale, spare = grant(org, 100), grant(org, 1000)
        key, _ = APIKey.objects.create_key(org, "k")
        budgets = [Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00")),
                   Budget.objects.create(organization=org, limit=Decimal("1.00"))]
        Entitlement.objects.filter(pk=stale.pk).update(tokens_used=50)  # the snapshot still says 0
        try:
            quotas.reserve([stale], 60, "req_alone", cost=Decimal("0.10"), budgets=budgets)
        except GatewayError as exc:
            alone = exc.code
        hold = quotas.reserve([stale, spare], 60, "req_two", cost=Decimal("0.10"), budgets=budgets)
        return (alone, hold.entitlement_id == spare.pk,
                [b.reserved for b in Budget.objects.order_by("pk")],
                list(Entitlement.objects.order_by("pk").values_list("tokens_reserved", flat=True)))

    alone, paid_by_spare, reserved, tokens_reserved = on_sqlite(scenario)
    assert alone == "insufficient_quota"
    assert paid_by_spare and reserved == [Decimal("0.10"), Decimal("0.10")] and tokens_reserved == [0, 60]


def test_settlements_on_sqlite_charge_the_use_release_the_hold_and_charge_late_ones_what_fits(on_sqlite):
    """settle_statements' SQLite text: tokens and cost charged (never above the hold), the hold released,
    the record written and the key marked used; once the sweep released a hold, what fits beside the holds
    in flight."""
    from decimal import Decimal

    from inference.models import Budget

    def scenario():
        org = Organization.objects.create(name="Lite", slug="lite")
        entitlement = grant(org, 1000)
        key, _ = APIKey.objects.create_key(org, "k")
        key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
        org_budget = Budget.objects.create(organization=org, limit=Decimal("5.00"))
        both = [key_budget, org_budget]

        def record(request_id, cost):
            return UsageRecord(organization=org, api_key=key, model_name="m", endpoint="chat/completions",
                               prompt_tokens=10, completion_tokens=5, cost=Decimal(cost), status="ok",
                               http_status=200, latency_ms=1.0, request_id=request_id)

        def state():
            rows = [Budget.objects.get(pk=b.pk) for b in both]
            e = Entitlement.objects.get(pk=entitlement.pk)
            return [*(v for b in rows for v in (b.spent, b.reserved)), e.tokens_used, e.tokens_reserved,
                    Reservation.objects.count()]

        out = {}
        hold = quotas.reserve([entitlement], 100, "req_1", cost=Decimal("0.40"), budgets=both)
        quotas.settle(hold, 50, record("req_1", "0.15"), key)
        out["settled"] = state(), APIKey.objects.get(pk=key.pk).last_used_at is not None
        hold = quotas.reserve([entitlement], 100, "req_2", cost=Decimal("0.30"), budgets=both)
        quotas.settle(hold, 150, record("req_2", "0.90"))  # more than held: charged the hold
        out["above_the_hold"] = state()
        late = quotas.reserve([entitlement], 300, "req_late", cost=Decimal("0.40"), budgets=both)
        Reservation.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
        out["swept"] = quotas.expire_reservations(), state()
        other = quotas.reserve([entitlement], 600, "req_other", cost=Decimal("0.45"), budgets=both)
        quotas.settle(late, 300, record("req_late", "0.40"))  # what fits: 1000 - 150 - 600; $1 - 0.45 - 0.45
        out["late"] = state()
        quotas.settle(other, 200, None)
        out["other"] = state()
        out["records"] = sorted(UsageRecord.objects.values_list("request_id", flat=True))
        return out

    out = on_sqlite(scenario)
    d = Decimal
    assert out["settled"] == ([d("0.15"), 0, d("0.15"), 0, 50, 0, 0], True)
    assert out["above_the_hold"] == [d("0.45"), 0, d("0.45"), 0, 150, 0, 0]
    assert out["swept"] == (1, [d("0.45"), 0, d("0.45"), 0, 150, 0, 0])
    assert out["late"] == [d("0.55"), d("0.45"), d("0.85"), d("0.45"), 400, 600, 1]
    assert out["other"] == [d("0.55"), 0, d("0.85"), 0, 600, 0, 0]
    assert out["records"] == ["req_1", "req_2", "req_late"]


def test_a_keys_caller_acts_as_the_keys_creator_unless_told_otherwise(org):
    """Caller.__post_init__: a key's usage is its creator's when no user is named; a named user is kept."""
    from django.contrib.auth import get_user_model

    users = get_user_model().objects
    creator = users.create_user(f"creator{org.pk}@example.com", "pw-long-enough-1")
    other = users.create_user(f"other{org.pk}@example.com", "pw-long-enough-1")
    grant(org, None)
    key, raw = APIKey.objects.create_key(org, "k", created_by=creator)
    assert quotas.admit(raw).user_id == creator.pk
    assert quotas.Caller(key, [], {}, user_id=other.pk).user_id == other.pk


def test_a_model_the_caller_may_not_call_is_named_in_the_404(org):
    grant(org, None, model_names=["covered"])
    AIModel.objects.create(name="uncovered")
    catalog.invalidate()
    _, raw = APIKey.objects.create_key(org, "k")
    with pytest.raises(GatewayError) as err:
        quotas.admit(raw).resolve("uncovered")
    assert (err.value.status, err.value.message) == (
        404, "The model `uncovered` does not exist or you do not have access to it.")


def test_a_malformed_key_is_refused_without_a_database_round_trip(db, django_assert_num_queries):
    """_admit_steps: a key that cannot be one (no public id) never reaches the admission query."""
    catalog.entries()  # the catalog's own read, fresh for a few seconds
    with django_assert_num_queries(0), pytest.raises(GatewayError) as err:
        quotas.admit("sk-not-a-key")
    assert err.value.status == 401


def test_a_session_and_a_key_credential_are_admitted_in_one_query_each_plus_entitlements_and_budgets(
        org, django_assert_num_queries):
    """admit_session reads the membership with its user and organization, admit_key the key with its
    organization, in one query (then the entitlements and the budgets): no lazy load per admission."""
    from django.contrib.auth import get_user_model

    from accounts.models import Membership

    user = get_user_model().objects.create_user(f"q{org.pk}@example.com", "pw-long-enough-1")
    Membership.objects.create(organization=org, user=user)
    grant(org, None)
    key, _ = APIKey.objects.create_key(org, "k")
    catalog.entries()
    with django_assert_num_queries(3):
        assert quotas.admit_credential(quotas.SessionCredential(user.pk, org.pk)).organization.pk == org.pk
    with django_assert_num_queries(3):
        assert quotas.admit_credential(quotas.KeyCredential(key.pk)).api_key.pk == key.pk


def test_a_key_is_admitted_on_sqlite_with_its_columns_converted_as_the_orm_would(on_sqlite):
    """instance_from on SQLite (`make run`): the backend's converters (aware datetimes, decimals quantized
    to the field's places) and the field's (JSON decoded) are applied to the admission query's raw row."""
    from decimal import Decimal

    from inference.models import Budget

    def scenario():
        quotas._columns.cache_clear()  # converters are read once per process: here, SQLite's
        catalog.invalidate()  # and the catalog is read from SQLite's (empty) tables, not a fresh snapshot
        try:
            org = Organization.objects.create(name="Lite", slug="lite")
            grant(org, None, model_names=["m"])
            key, raw = APIKey.objects.create_key(org, "k", allowed_models=["m"])
            Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.5"))
            caller = quotas.admit(raw)
            return (caller.api_key.allowed_models, timezone.is_aware(caller.api_key.created_at),
                    [str(b.limit) for b in caller.budgets], caller.entitlements[0].model_names)
        finally:
            quotas._columns.cache_clear()
            catalog.invalidate()

    assert on_sqlite(scenario) == (["m"], True, ["1.50000000"], ["m"])


PRICED = {"price_input_per_million": 1, "price_output_per_million": 4}
PRICED_HOLD = 18 + 256 + 10  # MESSAGES uncounted, max_tokens 10
PRICED_COST = quotas.Decimal("0.00031400")  # 274 tokens at $1/M and the 10 of the completion at $4/M


def test_a_line_admitted_with_budgets_holds_its_worst_cost_on_each_and_without_them_holds_no_money(org):
    """admit_request: no budget, no money held (the hold's cost is 0, whatever the model's prices); with the
    key's and the organization's budgets, the request's worst cost held on both. The limiter's slot is named
    by the request id."""
    from decimal import Decimal

    from inference.models import Budget

    entitlement = grant(org, None)
    served_model("priced-line-model", **PRICED)
    key, _ = APIKey.objects.create_key(org, "batch")
    credential = quotas.KeyCredential(key.pk)
    limiter = RateLimiter("", "refuse", 0.5)
    chat = {"model": "priced-line-model", "messages": MESSAGES, "max_tokens": 10}
    admitted = quotas.admit_request(credential, parse_chat(chat), None, "req_unbudgeted", limiter)
    assert (admitted.hold.tokens, admitted.hold.cost, admitted.hold.budget_ids) == (PRICED_HOLD, 0, ())
    assert Reservation.objects.get(request_id="req_unbudgeted").cost == 0
    assert admitted.decision.concurrency_slot == "req_unbudgeted"
    key_budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
    org_budget = Budget.objects.create(organization=org, limit=Decimal("2.00"))
    admitted = quotas.admit_request(credential, parse_chat(chat), None, "req_budgeted", limiter)
    assert (admitted.hold.cost, admitted.hold.budget_ids) == (PRICED_COST, (key_budget.pk, org_budget.pk))
    assert [Budget.objects.get(pk=b.pk).reserved for b in (key_budget, org_budget)] == [PRICED_COST, PRICED_COST]
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == 2 * PRICED_HOLD


def test_a_keys_own_rate_limit_applies_to_the_lines_it_submitted(org):
    """admit_request charges the key's limits as well as the organization's."""
    grant(org, None)
    served_model("key-limited-model")
    key, _ = APIKey.objects.create_key(org, "batch", requests_per_minute=1)
    limiter = RateLimiter("", "refuse", 0.5)
    chat = parse_chat({"model": "key-limited-model", "messages": MESSAGES, "max_tokens": 10})
    assert quotas.admit_request(quotas.KeyCredential(key.pk), chat, None, "req_first", limiter).decision.allowed
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(quotas.KeyCredential(key.pk), chat, None, "req_second", limiter)
    assert (err.value.status, err.value.code) == (429, "rate_limit_exceeded")
    assert Reservation.objects.count() == 1


def test_a_model_without_a_replica_is_admitted_on_its_fallbacks_replica_when_that_serves_the_endpoint(org):
    """_route's 503 check looks past the model to the fallbacks the caller may use and that serve the
    request's endpoint: an embeddings fallback never answers a chat request."""
    from inference.models import ModelFallback

    grant(org, None)
    primary = AIModel.objects.create(name="primary-model")
    embedder = AIModel.objects.create(name="embedder-fallback", kind="embeddings")
    Deployment.objects.create(model=embedder, base_url="http://127.0.0.1:18")
    ModelFallback.objects.create(model=primary, fallback=embedder, position=0)
    lone = AIModel.objects.create(name="lone-model")
    ModelFallback.objects.create(model=lone, fallback=embedder, position=0)
    chatty = AIModel.objects.create(name="chat-fallback")
    Deployment.objects.create(model=chatty, base_url="http://127.0.0.1:19")
    ModelFallback.objects.create(model=primary, fallback=chatty, position=1)
    catalog.invalidate()
    key, _ = APIKey.objects.create_key(org, "batch")
    limiter = RateLimiter("", "refuse", 0.5)
    chat = {"messages": MESSAGES, "max_tokens": 10}
    admitted = quotas.admit_request(quotas.KeyCredential(key.pk), parse_chat({"model": "primary-model", **chat}),
                                    None, "req_fallback", limiter)
    assert (admitted.entry.model.name, admitted.upstream.base_url) == ("primary-model", "http://127.0.0.1:19")
    with pytest.raises(GatewayError) as err:
        quotas.admit_request(quotas.KeyCredential(key.pk), parse_chat({"model": "lone-model", **chat}), None,
                             "req_lone", limiter)
    assert err.value.status == 503


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_admission_on_the_event_loop_reports_the_bodys_error_and_holds_the_worst_cost_on_the_budgets():
    """admit_request_async: the body's own 400 (after `labels` learn the organization), and an admission
    that carries its caller, model, replica and a hold of the worst cost on the key's budget."""
    from decimal import Decimal

    from inference.models import Budget

    def setup():
        org = Organization.objects.create(name="Async budget", slug="async-budget")
        grant(org, None)
        served_model("priced-async-model", **PRICED)
        key, raw = APIKey.objects.create_key(org, "k")
        budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"))
        return org, key, raw, budget

    org, key, raw, budget = await in_thread(setup)
    limiter = RateLimiter("", "refuse", 0.5)
    bad_body = GatewayError(400, "messages is required", param="messages")
    labels = {}
    with pytest.raises(GatewayError) as err:
        await quotas.admit_request_async(raw, None, bad_body, "req_bad", limiter, labels)
    assert err.value is bad_body and labels == {"organization": org.slug}
    chat = parse_chat({"model": "priced-async-model", "messages": MESSAGES, "max_tokens": 10})
    admitted = await quotas.admit_request_async(raw, chat, None, "req_async_budget", limiter)
    assert (admitted.caller.api_key.pk, admitted.entry.model.name, admitted.upstream.base_url) == (
        key.pk, "priced-async-model", "http://127.0.0.1:9")
    assert (admitted.hold.tokens, admitted.hold.cost, admitted.hold.budget_ids) == (PRICED_HOLD, PRICED_COST, (budget.pk,))

    def reserved():
        return Budget.objects.get(pk=budget.pk).reserved

    assert await in_thread(reserved) == PRICED_COST


@pytest.mark.django_db(transaction=True)
async def test_a_hold_off_the_asyncio_pool_is_refused_at_once_when_the_room_is_held(settings):
    """reserve_async without the asyncio pool (GATEWAY_ASYNC_DB off, or SQLite) runs in a database thread
    and does not wait: the threads that would settle the holds in flight are those few threads."""
    settings.GATEWAY_ASYNC_DB = False
    settings.GATEWAY_QUOTA_WAIT_SECONDS = 20

    def setup():
        org = Organization.objects.create(name="No pool", slug="no-pool")
        entitlement = grant(org, 1000)
        quotas.reserve([entitlement], 600, "req_held")
        return entitlement

    entitlement = await in_thread(setup)
    started = time.monotonic()
    with pytest.raises(GatewayError) as err:
        await quotas.reserve_async([entitlement], 500, "req_refused")
    assert err.value.code == "quota_in_flight" and time.monotonic() - started < 0.5


def test_a_late_settlement_charges_each_budget_only_what_fits_beside_the_holds_in_flight(org):
    """The one-statement PostgreSQL settle of a hold the sweep already released: the budget is charged
    what its limit leaves beside what is spent and what other requests hold, not the whole cost."""
    from decimal import Decimal

    from inference.models import Budget

    entitlement = grant(org, 1000)
    key, _ = APIKey.objects.create_key(org, "k")
    budget = Budget.objects.create(organization=org, api_key=key, limit=Decimal("1.00"), spent=Decimal("0.10"))
    late = quotas.reserve([entitlement], 100, "req_late", cost=Decimal("0.40"), budgets=[budget])
    expire_all_holds()
    quotas.reserve([entitlement], 100, "req_other", cost=Decimal("0.70"), budgets=[budget])
    record = usage_record(org, key, "req_late")
    record.cost = Decimal("0.40")
    quotas.settle(late, 100, record, key)
    budget.refresh_from_db()
    assert (budget.spent, budget.reserved) == (Decimal("0.30"), Decimal("0.70"))  # 0.10 + the 0.20 left


def test_a_key_that_is_no_longer_usable_is_refused_with_why(org):
    """check_caller's 401 names the key (redacted) and its state: revoked, expired, or disabled (its
    organization's), in the words the console uses."""
    grant(org, None)
    revoked, raw_revoked = APIKey.objects.create_key(org, "revoked")
    APIKey.objects.filter(pk=revoked.pk).update(revoked_at=timezone.now())
    expired, raw_expired = APIKey.objects.create_key(org, "expired")
    APIKey.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    usable, raw_usable = APIKey.objects.create_key(org, "usable")
    messages = []
    for raw in (raw_revoked, raw_expired):
        with pytest.raises(GatewayError) as err:
            quotas.admit(raw)
        messages.append((err.value.status, err.value.code, err.value.message))
    Organization.objects.filter(pk=org.pk).update(is_active=False)
    with pytest.raises(GatewayError) as err:
        quotas.admit(raw_usable)
    messages.append((err.value.status, err.value.code, err.value.message))
    assert messages == [(401, "invalid_api_key", f"The API key {revoked.redacted} is revoked."),
                        (401, "invalid_api_key", f"The API key {expired.redacted} is expired."),
                        (401, "invalid_api_key", f"The API key {usable.redacted} is disabled.")]


def test_a_line_admitted_in_a_thread_holds_its_prompt_as_the_replicas_tokenizer_counts_it(org, settings):
    """admit_request counts the prompt with the replica's published tokenizer (here already fetched) and
    the model's tool format, as the event loop's path does: the hold is the exact prompt plus max_tokens
    (or the default completion bound), not the byte bound plus the overhead."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    from engine.prompts import PromptBuilder
    from engine.tokenizer import Tokenizer
    from inference import prompt_count

    settings.GATEWAY_DEFAULT_MAX_TOKENS = 100
    grant(org, None)
    model = served_model("counted-line-model", tool_format="hermes", context_length=4096)
    backend = Backend(models.WordLevel({"[UNK]": 0, "say": 1, "tools": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "{% for m in messages %}say {{ m.content }} {% endfor %}{% if tools %}tools{% endif %}"
    builder = PromptBuilder(Tokenizer(backend, chat_template=template))
    deployment = model.deployments.get()
    prompt_count._builders[(deployment.pk, deployment.base_url)] = builder
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}
    bodies = {"plain": {"messages": MESSAGES, "max_tokens": 10},
              "with_tools": {"messages": MESSAGES, "max_tokens": 10, "tools": [tool]},
              "no_max_tokens": {"messages": MESSAGES}}
    try:
        key, _ = APIKey.objects.create_key(org, "batch")
        held = {name: quotas.admit_request(quotas.KeyCredential(key.pk),
                                           parse_chat({"model": "counted-line-model", **body}), None, f"req_{name}",
                                           RateLimiter("", "refuse", 0.5)).hold.tokens
                for name, body in bodies.items()}
    finally:
        prompt_count.forget()
    assert builder.chat_ids(MESSAGES, None, None) == [1, 0]  # "say héllo"
    # the model's tool format (hermes: tools described in a system message), not the template's own
    hermes, native = (len(builder.chat_ids(MESSAGES, [tool], fmt)) for fmt in ("hermes", "auto"))
    assert hermes > native == 3
    assert held == {"plain": 2 + 10, "with_tools": hermes + 10, "no_max_tokens": 2 + 100}


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("async_pool_closed")
async def test_admission_on_the_event_loop_never_waits_behind_the_thread_sensitive_thread():
    """Django runs thread-sensitive sync code (sync views and middleware) on one shared thread: a session's
    admission and the catalog refresh run in threads of their own, so requests are admitted while that
    thread is busy."""
    from asgiref.sync import sync_to_async

    org, user, key, raw = await in_thread(lambda: member_with_key("busy-thread"))
    busy = threading.Event()
    occupant = asyncio.ensure_future(sync_to_async(busy.wait, thread_sensitive=True)())
    try:
        catalog.invalidate()  # each admission refreshes the catalog
        session = await asyncio.wait_for(quotas.admit_credential_async(quotas.SessionCredential(user.pk, org.pk)), 15)
        catalog.invalidate()
        keyed = await asyncio.wait_for(quotas.admit_credential_async(raw), 15)
    finally:
        busy.set()
        await occupant
    assert (session.organization.pk, keyed.api_key.pk) == (org.pk, key.pk)
