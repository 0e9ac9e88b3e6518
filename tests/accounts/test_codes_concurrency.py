"""Concurrent redemptions with real PostgreSQL transactions: one thread (and connection) per request."""

from __future__ import annotations

import threading

import pytest
from django.db import connection
from django.test import override_settings

from accounts import codes
from accounts.models import AuthorizationCode, Entitlement

from .codes_fixtures import *  # noqa: F403  (fixtures)
from .codes_fixtures import issue_one, make_member

pytestmark = pytest.mark.django_db(transaction=True)


def race(attempts: list[tuple], raw: str | None = None) -> list:
    """Start every (organization, user[, code]) redemption at the same instant; return each outcome."""
    barrier = threading.Barrier(len(attempts))
    outcomes: list = [None] * len(attempts)

    def attempt(i: int, org, user, code=None) -> None:
        try:
            barrier.wait(timeout=30)
            outcomes[i] = codes.redeem(org, code or raw, user)
        except Exception as exc:  # recorded, asserted below
            outcomes[i] = exc
        finally:
            connection.close()  # each thread has its own connection

    threads = [threading.Thread(target=attempt, args=(i, *args)) for i, args in enumerate(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def members(n: int, prefix: str) -> list[tuple]:
    return [(org, user) for user, org in (make_member(f"{prefix}{i}@example.com", f"{prefix}-{i}") for i in range(n))]


def test_single_use_code_redeemed_concurrently_by_many_orgs_has_exactly_one_winner():
    raw = issue_one()
    outcomes = race(members(8, "racer"), raw)
    winners = [o for o in outcomes if isinstance(o, Entitlement)]
    losers = [o for o in outcomes if not isinstance(o, Entitlement)]
    assert len(winners) == 1, outcomes
    assert all(isinstance(o, codes.CodeUsedUp) for o in losers), outcomes
    assert Entitlement.objects.count() == 1
    assert AuthorizationCode.objects.get().redemption_count == 1


def test_code_with_k_redemptions_yields_exactly_k_entitlements_under_a_race():
    raw = issue_one(max_redemptions=3)
    outcomes = race(members(8, "k"), raw)
    assert sum(isinstance(o, Entitlement) for o in outcomes) == 3, outcomes
    assert sum(isinstance(o, codes.CodeUsedUp) for o in outcomes) == 5, outcomes
    assert Entitlement.objects.count() == 3
    assert AuthorizationCode.objects.get().redemption_count == 3


def test_same_org_racing_itself_gets_one_entitlement():
    raw = issue_one(max_redemptions=5)
    racers = [make_member(f"self{i}@example.com", "self-race") for i in range(6)]  # six members, one org
    org = racers[0][1]
    outcomes = race([(org, user) for user, _ in racers], raw)
    assert sum(isinstance(o, Entitlement) for o in outcomes) == 1, outcomes
    assert all(isinstance(o, Entitlement | codes.AlreadyRedeemed) for o in outcomes), outcomes
    assert Entitlement.objects.for_org(org).count() == 1
    assert AuthorizationCode.objects.get().redemption_count == 1


@override_settings(REDEEM_FAILURES_PER_USER=3, REDEEM_FAILURES_PER_IP=100)
def test_a_burst_of_concurrent_guesses_is_capped_at_the_limit():
    user, org = make_member("burst@example.com", "burst")
    guesses = [(org, user, f"mac-{i:08x}-" + "a" * 26) for i in range(10)]
    outcomes = race(guesses)
    assert sum(isinstance(o, codes.UnknownCode) for o in outcomes) == 3, outcomes
    assert sum(isinstance(o, codes.RedemptionRateLimited) for o in outcomes) == 7, outcomes
