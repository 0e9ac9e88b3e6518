"""Concurrent redemptions with real PostgreSQL transactions: one thread (and connection) per request."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from accounts import codes
from accounts.models import AuthorizationCode, Entitlement

from .codes_fixtures import *  # noqa: F403  (fixtures)
from .codes_fixtures import issue_one, make_member

pytestmark = pytest.mark.django_db(transaction=True)


def race(attempts: list[tuple], raw: str) -> list:
    """Start every (organization, user) redemption at the same instant; return each outcome."""
    barrier = threading.Barrier(len(attempts))
    outcomes: list = [None] * len(attempts)

    def attempt(i: int, org, user) -> None:
        try:
            barrier.wait(timeout=30)
            outcomes[i] = codes.redeem(org, raw, user)
        except Exception as exc:  # recorded, asserted below
            outcomes[i] = exc
        finally:
            connection.close()  # each thread has its own connection

    threads = [threading.Thread(target=attempt, args=(i, org, user)) for i, (org, user) in enumerate(attempts)]
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
    user, org = make_member("self@example.com", "self-race")
    outcomes = race([(org, user)] * 6, raw)
    assert sum(isinstance(o, Entitlement) for o in outcomes) == 1, outcomes
    assert all(isinstance(o, Entitlement | codes.AlreadyRedeemed) for o in outcomes), outcomes
    assert Entitlement.objects.for_org(org).count() == 1
    assert AuthorizationCode.objects.get().redemption_count == 1
