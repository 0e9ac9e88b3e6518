"""The last-owner rule under real concurrent PostgreSQL transactions: two owners demoting each other
at the same moment must leave one owner."""

from __future__ import annotations

import threading

import pytest
from django.core.exceptions import PermissionDenied
from django.db import connection

from accounts import tenancy
from accounts.models import Membership, Role

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import add_member, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def test_two_owners_demoting_each_other_concurrently_leave_one_owner(org_a, owner_a):
    assert connection.vendor == "postgresql"
    first = Membership.objects.get(user=owner_a)
    second = add_member(org_a, make_user("co-owner@example.com"), Role.OWNER)
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def demote(actor_pk: int, target_pk: int) -> None:
        try:
            actor, target = Membership.objects.get(pk=actor_pk), Membership.objects.get(pk=target_pk)
            barrier.wait(timeout=10)
            tenancy.change_role(actor, target, Role.MEMBER)
            outcomes.append("demoted")
        except (tenancy.TenancyError, PermissionDenied):
            outcomes.append("refused")
        finally:
            connection.close()

    threads = [
        threading.Thread(target=demote, args=(first.pk, second.pk)),
        threading.Thread(target=demote, args=(second.pk, first.pk)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["demoted", "refused"]
    assert Membership.objects.filter(organization=org_a, role=Role.OWNER).count() == 1


def test_roles_are_checked_as_they_are_now_not_as_loaded(org_a, owner_a):
    stale_actor = add_member(org_a, make_user("was-admin@example.com"), Role.ADMIN)
    target = add_member(org_a, make_user("target@example.com"), Role.MEMBER)
    tenancy.change_role(Membership.objects.get(user=owner_a), Membership.objects.get(pk=stale_actor.pk), Role.MEMBER)
    with pytest.raises(PermissionDenied):
        tenancy.remove_member(stale_actor, target)  # still says ADMIN in memory
    assert Membership.objects.filter(pk=target.pk).exists()
