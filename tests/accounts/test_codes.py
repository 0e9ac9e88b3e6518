"""Authorization codes: issuing, every redemption outcome, expiry, K redemptions, revocation, brute-force limits."""

from __future__ import annotations

import datetime as dt

import pytest
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from accounts import codes
from accounts.audit import client_ip
from accounts.models import AuthorizationCode, Entitlement, keyed_hash

from .codes_fixtures import *  # noqa: F403  (fixtures)
from .codes_fixtures import issue_one, make_member

pytestmark = pytest.mark.django_db


# --- issuing --------------------------------------------------------------------------------------


def test_issue_stores_only_hash_and_visible_prefix():
    issued = codes.issue_codes(3, token_quota=1000, validity_days=30, model_names="m1, m2,m1", max_redemptions=2)
    assert len(issued) == 3
    assert len({item.raw for item in issued}) == 3
    assert len({item.code.batch for item in issued}) == 1
    for item in issued:
        row = AuthorizationCode.objects.get(pk=item.code.pk)
        assert codes.parse_code(item.raw) is not None
        assert item.raw.startswith("mac-") and len(item.raw) == len("mac-") + 8 + 1 + 26
        assert row.prefix == item.raw[:12]
        assert row.code_hash == keyed_hash(item.raw)
        assert row.code_hash != item.raw
        assert (row.token_quota, row.validity_days, row.model_names, row.max_redemptions) == (1000, 30, ["m1", "m2"], 2)
        # The secret part appears in no column.
        secret = item.raw.rsplit("-", 1)[1]
        values = AuthorizationCode.objects.filter(pk=row.pk).values().get()
        assert not any(secret in str(value) for value in values.values())


@pytest.mark.parametrize(
    "count, options, field, says",
    [
        (0, {}, "count", "The number of codes must be between 1 and 10000."),
        (codes.MAX_CODES_PER_BATCH + 1, {}, "count", "The number of codes must be between 1 and 10000."),
        ("3", {}, "count", "The number of codes must be between 1 and 10000."),
        (1, {"token_quota": 0}, "token_quota",
         "The token quota must be a positive number (leave it empty for unlimited)."),
        (1, {"validity_days": 0}, "validity_days", "The validity must be at least one day (leave it empty for no end)."),
        (1, {"max_redemptions": 0}, "max_redemptions", "A code must be redeemable at least once."),
        (1, {"expires_at": timezone.now() - dt.timedelta(seconds=1)}, "expires_at", "The expiry date must be in the future."),
        (1, {"model_names": "good, bad name!"}, "model_names", "bad name!"),
    ],
)
def test_issue_rejects_bad_options_and_creates_nothing(count, options, field, says):
    with pytest.raises(ValidationError) as info:
        codes.issue_codes(count, **options)
    message = info.value.message_dict[field][0]
    assert list(info.value.message_dict) == [field] and (message == says if field != "model_names" else says in message)
    assert AuthorizationCode.objects.count() == 0


def test_a_code_expiring_at_this_very_instant_is_refused(monkeypatch):
    """"Must be in the future": an expiry equal to now is already past (it could never be redeemed)."""
    instant = timezone.now()
    monkeypatch.setattr(codes.timezone, "now", lambda: instant)
    with pytest.raises(ValidationError) as info:
        codes.issue_codes(1, expires_at=instant)
    assert info.value.message_dict == {"expires_at": ["The expiry date must be in the future."]}
    assert len(codes.issue_codes(1, expires_at=instant + dt.timedelta(microseconds=1))) == 1


def test_a_code_is_not_redeemed_at_the_instant_it_expires(alice, monkeypatch):
    user, org = alice
    ends = timezone.now() + dt.timedelta(hours=1)
    raw = issue_one(expires_at=ends)
    monkeypatch.setattr(codes.timezone, "now", lambda: ends)
    with pytest.raises(codes.CodeExpired):
        codes.redeem(org, raw, user)
    monkeypatch.setattr(codes.timezone, "now", lambda: ends - dt.timedelta(microseconds=1))
    assert codes.redeem(org, raw, user).code.expires_at == ends


def test_issue_accepts_the_smallest_terms_and_a_full_batch(monkeypatch):
    expires = timezone.now() + dt.timedelta(seconds=30)
    smallest = codes.issue_codes(1, token_quota=1, validity_days=1, expires_at=expires, model_names=["m1"],
                                 note="pilot")[0].code
    row = AuthorizationCode.objects.get(pk=smallest.pk)
    assert (row.token_quota, row.validity_days, row.max_redemptions, row.model_names, row.note) == (1, 1, 1, ["m1"], "pilot")
    assert row.expires_at == expires
    plain = AuthorizationCode.objects.get(pk=codes.issue_codes(1)[0].code.pk)
    assert (plain.note, plain.expires_at, plain.created_by) == ("", None, None)  # no note, no expiry, nobody
    monkeypatch.setattr(codes, "MAX_CODES_PER_BATCH", 5)  # the boundary, without issuing 10,000 codes
    assert len(codes.issue_codes(5)) == 5 and AuthorizationCode.objects.count() == 7
    with pytest.raises(ValidationError, match="between 1 and 5"):
        codes.issue_codes(6)


def test_issued_by_is_recorded(alice):
    code = codes.issue_codes(1, created_by=alice[0])[0].code
    assert AuthorizationCode.objects.get(pk=code.pk).created_by == alice[0]


def test_parse_code_refuses_what_is_not_a_string():
    assert codes.parse_code(None) is None and codes.parse_code(12345) is None
    raw = codes.generate_raw_code()
    assert codes.parse_code(f" {raw.upper()} ") == (raw[:12], raw)


def test_model_names_from_a_list_a_string_or_nothing():
    assert codes.clean_model_names(None) == [] and codes.clean_model_names("") == []
    assert codes.clean_model_names(["m2", "m1", "m2"]) == ["m2", "m1"]
    assert codes.clean_model_names("m2,m1") == ["m2", "m1"]


# --- redeeming: success and every outcome -------------------------------------------------------


def test_redeem_grants_entitlement_with_the_codes_terms(alice):
    user, org = alice
    raw = issue_one(token_quota=5000, validity_days=10, model_names=["smollm2"])
    before = timezone.now()
    entitlement = codes.redeem(org, f"  {raw.upper()}\n", user)  # whitespace and case do not matter
    assert entitlement.organization == org
    assert entitlement.code.prefix == raw[:12]
    assert entitlement.token_quota == 5000 and entitlement.tokens_remaining == 5000
    assert entitlement.model_names == ["smollm2"]
    assert before <= entitlement.starts_at <= timezone.now()
    assert entitlement.ends_at == entitlement.starts_at + dt.timedelta(days=10)
    assert AuthorizationCode.objects.get().redemption_count == 1
    assert list(Entitlement.objects.for_org(org).active()) == [entitlement]


def test_redeeming_one_code_counts_only_that_code_and_a_grant_without_code_does_not_block(alice):
    user, org = alice
    Entitlement.objects.create(organization=org, token_quota=10)  # granted by an operator, not by a code
    first, second = issue_one(max_redemptions=5), issue_one(max_redemptions=5)
    assert codes.redeem(org, first, user).code.prefix == first[:12]
    counts = dict(AuthorizationCode.objects.values_list("prefix", "redemption_count"))
    assert counts == {first[:12]: 1, second[:12]: 0}


def test_unlimited_code_grants_unlimited_open_ended_entitlement(alice):
    entitlement = codes.redeem(alice[1], issue_one(), alice[0])
    assert entitlement.token_quota is None and entitlement.tokens_remaining is None
    assert entitlement.ends_at is None and entitlement.model_names == []
    assert entitlement.allows_model("anything")


def _assert_nothing_changed(code_count: int = 0):
    assert Entitlement.objects.count() == 0
    assert sum(AuthorizationCode.objects.values_list("redemption_count", flat=True)) == code_count


@pytest.mark.parametrize("raw", ["", "nonsense", "mac-00000000-" + "a" * 26, "sk-abc", "mac-zz-short", "x" * 500])
def test_unknown_or_malformed_code(alice, raw):
    issue_one()
    with pytest.raises(codes.UnknownCode, match="does not exist"):
        codes.redeem(alice[1], raw, alice[0])
    _assert_nothing_changed()


def test_wrong_secret_with_a_real_prefix_is_unknown(alice):
    raw = issue_one()
    tampered = raw[:-1] + ("a" if raw[-1] != "a" else "b")
    with pytest.raises(codes.UnknownCode):
        codes.redeem(alice[1], tampered, alice[0])
    _assert_nothing_changed()


def test_expired_code(alice):
    raw = issue_one(expires_at=timezone.now() + dt.timedelta(hours=1))
    AuthorizationCode.objects.update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    with pytest.raises(codes.CodeExpired, match="expired"):
        codes.redeem(alice[1], raw, alice[0])
    _assert_nothing_changed()


def test_code_is_redeemable_until_its_expiry(alice):
    raw = issue_one(expires_at=timezone.now() + dt.timedelta(minutes=5))
    assert codes.redeem(alice[1], raw, alice[0]).pk


def test_expiry_date_is_inclusive_end_of_day():
    day = dt.date(2030, 1, 31)
    assert codes.end_of_day(day) == dt.datetime(2030, 2, 1, tzinfo=dt.UTC)


def test_revoked_code(alice):
    raw = issue_one()
    codes.revoke_code(AuthorizationCode.objects.get())
    with pytest.raises(codes.CodeRevoked, match="revoked"):
        codes.redeem(alice[1], raw, alice[0])
    _assert_nothing_changed()


def test_already_redeemed_by_this_org(alice):
    raw = issue_one(max_redemptions=3)
    codes.redeem(alice[1], raw, alice[0])
    with pytest.raises(codes.AlreadyRedeemed, match="already redeemed"):
        codes.redeem(alice[1], raw, alice[0])
    assert Entitlement.objects.count() == 1
    assert AuthorizationCode.objects.get().redemption_count == 1


def test_max_redemptions_k_then_used_up(db):
    raw = issue_one(max_redemptions=3)
    orgs = [make_member(f"u{i}@example.com", f"org-{i}") for i in range(4)]
    for user, org in orgs[:3]:
        codes.redeem(org, raw, user)
    with pytest.raises(codes.CodeUsedUp, match="maximum number of times"):
        codes.redeem(orgs[3][1], raw, orgs[3][0])
    assert Entitlement.objects.count() == 3
    assert AuthorizationCode.objects.get().redemption_count == 3
    assert not Entitlement.objects.for_org(orgs[3][1]).exists()


def test_no_organization_is_refused():
    with pytest.raises(codes.NoOrganization):
        codes.redeem(None, "mac-00000000-" + "a" * 26)


@pytest.mark.parametrize(("seconds", "retry_after", "says"), [
    (0, 1, "Try again in 1 minute."), (1, 1, "Try again in 1 minute."), (60, 60, "Try again in 1 minute."),
    (61, 61, "Try again in 2 minutes."), (900, 900, "Try again in 15 minutes."),
])
def test_rate_limited_says_when_to_retry_in_whole_minutes(seconds, retry_after, says):
    refused = codes.RedemptionRateLimited(retry_after=seconds)
    assert refused.retry_after == retry_after
    assert str(refused) == refused.message == f"Too many failed redemption attempts. {says}"
    assert (refused.code, refused.http_status) == ("rate_limited", 429)


def test_an_outcome_keeps_its_message_unless_given_one():
    assert str(codes.UnknownCode()) == codes.UnknownCode.message
    custom = codes.CodeExpired("This code ended yesterday.")
    assert str(custom) == custom.message == "This code ended yesterday." and custom.code == "code_expired"


def test_each_outcome_is_a_distinct_class_with_a_distinct_message():
    classes = [codes.UnknownCode, codes.CodeExpired, codes.CodeRevoked, codes.CodeUsedUp, codes.AlreadyRedeemed]
    assert len({cls.message for cls in classes}) == len(classes)
    assert len({cls.code for cls in classes}) == len(classes)
    assert all(issubclass(cls, codes.RedemptionError) for cls in classes)


# --- revocation -----------------------------------------------------------------------------------


def test_revoke_entitlement_takes_it_out_of_active(alice):
    entitlement = codes.redeem(alice[1], issue_one(), alice[0])
    assert Entitlement.objects.for_org(alice[1]).active().exists()
    assert codes.revoke_entitlement(entitlement) is True
    assert codes.revoke_entitlement(entitlement) is False
    assert entitlement.revoked_at is not None
    assert not Entitlement.objects.for_org(alice[1]).active().exists()


def test_revoking_a_code_again_keeps_the_first_revocation(alice):
    codes.redeem(alice[1], issue_one(), alice[0])
    code = AuthorizationCode.objects.get()
    codes.revoke_code(code)
    first = code.revoked_at
    assert codes.revoke_code(code) == 0 and code.revoked_at == first
    assert AuthorizationCode.objects.get().revoked_at == first
    assert codes.revoke_code(code, with_entitlements=True) == 1  # its grant was still active
    assert codes.revoke_code(code, with_entitlements=True) == 0


def test_revoking_one_code_or_entitlement_leaves_the_others(alice, bob):
    first, second = issue_one(max_redemptions=2), issue_one(max_redemptions=2)
    a_first, b_second = codes.redeem(alice[1], first, alice[0]), codes.redeem(bob[1], second, bob[0])
    code = AuthorizationCode.objects.get(prefix=first[:12])
    assert codes.revoke_code(code, with_entitlements=True) == 1
    a_first.refresh_from_db()
    b_second.refresh_from_db()
    assert a_first.revoked_at is not None and b_second.revoked_at is None
    assert AuthorizationCode.objects.get(prefix=second[:12]).revoked_at is None
    b_first = codes.redeem(alice[1], second, alice[0])  # the other code is still redeemable
    assert codes.revoke_entitlement(b_first) is True
    b_second.refresh_from_db()
    assert b_second.revoked_at is None and list(Entitlement.objects.active()) == [b_second]


def test_revoke_code_keeps_or_revokes_its_entitlements(alice, bob):
    raw = issue_one(max_redemptions=2)
    codes.redeem(alice[1], raw, alice[0])
    code = AuthorizationCode.objects.get()
    assert codes.revoke_code(code) == 0
    assert code.revoked_at is not None
    assert Entitlement.objects.for_org(alice[1]).active().count() == 1  # existing access unchanged
    with pytest.raises(codes.CodeRevoked):
        codes.redeem(bob[1], raw, bob[0])
    assert codes.revoke_code(code, with_entitlements=True) == 1
    assert not Entitlement.objects.active().exists()


def test_active_queryset_rules(alice):
    now = timezone.now()
    org = alice[1]
    make = lambda **kw: Entitlement.objects.create(organization=org, **kw)  # noqa: E731
    current = make(starts_at=now - dt.timedelta(days=1), ends_at=now + dt.timedelta(days=1))
    exhausted = make(token_quota=10, tokens_used=10)
    make(starts_at=now + dt.timedelta(days=1))  # not started
    make(starts_at=now - dt.timedelta(days=2), ends_at=now - dt.timedelta(days=1))  # ended
    make(revoked_at=now)  # revoked
    assert set(Entitlement.objects.for_org(org).active()) == {current, exhausted}
    assert exhausted.tokens_remaining == 0 and exhausted.is_active()
    assert Entitlement(token_quota=100, tokens_used=30, tokens_reserved=20).tokens_remaining == 50


# --- brute-force limiting -------------------------------------------------------------------------


@override_settings(REDEEM_FAILURES_PER_USER=3, REDEEM_FAILURES_PER_IP=100)
def test_failures_are_limited_per_user_before_the_code_is_checked(alice):
    user, org = alice
    good = issue_one()
    for _ in range(3):
        with pytest.raises(codes.UnknownCode):
            codes.redeem(org, "mac-00000000-" + "b" * 26, user, ip="10.0.0.1")
    with pytest.raises(codes.RedemptionRateLimited, match="Too many failed redemption attempts") as info:
        codes.redeem(org, good, user, ip="10.0.0.2")  # even a valid code is not checked
    assert 0 < info.value.retry_after <= 900
    assert Entitlement.objects.count() == 0
    # Another user of the same organization is not affected.
    other, _ = make_member("carol@example.com", org.slug)
    assert codes.redeem(org, good, other, ip="10.0.0.3").pk


@override_settings(REDEEM_FAILURES_PER_USER=2, REDEEM_FAILURES_PER_IP=2, REDEEM_FAILURE_WINDOW_SECONDS=900)
def test_retry_after_is_what_is_left_of_the_window(alice):
    user, org = alice
    for _ in range(2):
        with pytest.raises(codes.UnknownCode):
            codes.redeem(org, "garbage", user, ip="10.0.0.4")
    cache.touch(f"redeem-fail:user:{user.pk}", 100)  # the window started 800 s ago
    with pytest.raises(codes.RedemptionRateLimited) as info:
        codes.redeem(org, "garbage", user, ip="10.0.0.5")
    assert 95 <= info.value.retry_after <= 100 and "Try again in 2 minutes." in info.value.message


@override_settings(REDEEM_FAILURES_PER_USER=1, REDEEM_FAILURES_PER_IP=100, REDEEM_FAILURE_WINDOW_SECONDS=900)
def test_retry_after_is_one_second_in_the_windows_last_second(alice):
    user, org = alice
    with pytest.raises(codes.UnknownCode):
        codes.redeem(org, "garbage", user)
    cache.touch(f"redeem-fail:user:{user.pk}", 1)
    with pytest.raises(codes.RedemptionRateLimited) as info:
        codes.redeem(org, "garbage", user)
    assert info.value.retry_after == 1


@override_settings(REDEEM_FAILURES_PER_USER=1, REDEEM_FAILURES_PER_IP=100, REDEEM_FAILURE_WINDOW_SECONDS=900)
def test_retry_after_is_the_whole_window_when_the_cache_cannot_say(alice):
    """Redis without an expiry on the counter (PERSIST), and a cache that is not Redis: the whole window."""
    user, org = alice
    with pytest.raises(codes.UnknownCode):
        codes.redeem(org, "garbage", user)
    key = f"redeem-fail:user:{user.pk}"
    cache._cache.get_client(key).persist(cache.make_and_validate_key(key))
    with pytest.raises(codes.RedemptionRateLimited) as info:
        codes.redeem(org, "garbage", user)
    assert info.value.retry_after == 900
    with override_settings(CACHES={"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}):
        with pytest.raises(codes.UnknownCode):
            codes.redeem(org, "garbage", user)
        with pytest.raises(codes.RedemptionRateLimited) as info:
            codes.redeem(org, "garbage", user)
        assert info.value.retry_after == 900


class _WindowEndsAfterAdd:
    """The cache, except that the first counter `add` starts expires at once: the window ending between
    `add` and `incr` (a race a real Redis cannot be made to lose on demand; the fault is injected here)."""

    def __init__(self, real):
        self.real, self.expired = real, False

    def add(self, key, *args, **kwargs):
        added = self.real.add(key, *args, **kwargs)
        if not self.expired:
            self.expired = self.real.delete(key)
        return added

    def __getattr__(self, name):
        return getattr(self.real, name)


def _ttl(key: str) -> int:
    return cache._cache.get_client(key).ttl(cache.make_and_validate_key(key))


@override_settings(REDEEM_FAILURES_PER_USER=5, REDEEM_FAILURE_WINDOW_SECONDS=900)
def test_a_window_ending_between_start_and_count_starts_a_new_one(alice, monkeypatch):
    user, org = alice
    faulty = _WindowEndsAfterAdd(cache)
    monkeypatch.setattr(codes, "cache", faulty)
    with pytest.raises(codes.UnknownCode):
        codes.redeem(org, "garbage", user)
    key = f"redeem-fail:user:{user.pk}"
    assert faulty.expired and cache.get(key) == 1 and 890 <= _ttl(key) <= 900  # counted, in a fresh window


def test_a_slot_given_back_after_its_window_ended_is_not_an_error_and_given_back_once(alice):
    user, _ = alice
    key = f"redeem-fail:user:{user.pk}"
    limiter = codes.FailureLimiter(user, None)
    limiter.acquire()
    assert cache.get(key) == 1
    cache.delete(key)  # the window ended while the redemption ran
    limiter.release()
    assert cache.get(key) is None  # no counter made up, no error
    again = codes.FailureLimiter(user, None)
    again.acquire()
    again.release()
    again.release()  # a second release gives nothing back
    assert cache.get(key) == 0


def test_without_a_user_or_an_address_nothing_is_counted(db):
    user, org = make_member("anon@example.com", "anon-org")
    with override_settings(REDEEM_FAILURES_PER_USER=1, REDEEM_FAILURES_PER_IP=1):
        for _ in range(3):  # a management command: no user, no address
            with pytest.raises(codes.UnknownCode):
                codes.redeem(org, "garbage")
        assert codes.redeem(org, issue_one()).pk
    assert codes.FailureLimiter(user.__class__(email="unsaved@example.com"), "").keys == []


def test_client_ip_is_the_peer_address(rf):
    assert client_ip(rf.get("/", REMOTE_ADDR="203.0.113.9")) == "203.0.113.9"
    assert client_ip(rf.get("/", REMOTE_ADDR="")) is None


@override_settings(REDEEM_FAILURES_PER_USER=100, REDEEM_FAILURES_PER_IP=4)
def test_failures_are_limited_per_ip_across_users(db):
    accounts = [make_member(f"p{i}@example.com", f"ip-org-{i}") for i in range(5)]
    good = issue_one()
    for user, org in accounts[:4]:
        with pytest.raises(codes.UnknownCode):
            codes.redeem(org, "garbage", user, ip="192.0.2.7")
    user, org = accounts[4]
    with pytest.raises(codes.RedemptionRateLimited):
        codes.redeem(org, good, user, ip="192.0.2.7")
    assert codes.redeem(org, good, user, ip="192.0.2.8").pk  # another address is fine


@override_settings(REDEEM_FAILURES_PER_USER=2, REDEEM_FAILURES_PER_IP=2)
def test_a_server_error_during_redemption_is_not_a_failed_guess(alice):
    user, org = alice
    raw = issue_one(validity_days=30)
    AuthorizationCode.objects.update(validity_days=10**7)  # its end date is past year 9999: a server error
    for _ in range(3):
        with pytest.raises(OverflowError):
            codes.redeem(org, raw, user, ip="10.0.0.9")
    assert Entitlement.objects.count() == 0 and AuthorizationCode.objects.get().redemption_count == 0
    AuthorizationCode.objects.update(validity_days=30)
    assert codes.redeem(org, raw, user, ip="10.0.0.9").pk  # no slot was kept: not rate limited


@override_settings(REDEEM_FAILURES_PER_USER=2, REDEEM_FAILURE_WINDOW_SECONDS=1)
def test_limit_window_expires(alice):
    import time

    for _ in range(2):
        with pytest.raises(codes.UnknownCode):
            codes.redeem(alice[1], "garbage", alice[0])
    with pytest.raises(codes.RedemptionRateLimited):
        codes.redeem(alice[1], "garbage", alice[0])
    time.sleep(1.3)
    with pytest.raises(codes.UnknownCode):
        codes.redeem(alice[1], "garbage", alice[0])


@override_settings(REDEEM_FAILURES_PER_USER=2)
def test_successes_and_refused_attempts_do_not_count(alice):
    user, org = alice
    counter = f"redeem-fail:user:{user.pk}"
    for _ in range(3):
        codes.redeem(org, issue_one(), user)
    assert cache.get(counter) == 0
    with pytest.raises(codes.UnknownCode):
        codes.redeem(org, "garbage", user)
    assert codes.redeem(org, issue_one(), user).pk
    with pytest.raises(codes.UnknownCode):
        codes.redeem(org, "garbage", user)
    assert cache.get(counter) == 2
    for _ in range(3):
        with pytest.raises(codes.RedemptionRateLimited):
            codes.redeem(org, issue_one(), user)
    assert cache.get(counter) == 2  # refused attempts gave their slot back
