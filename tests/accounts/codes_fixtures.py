"""Fixtures shared by the authorization-code tests (imported by tests/accounts/test_codes*.py)."""

from __future__ import annotations

import pytest
from django.core.cache import cache

from accounts import codes
from accounts.models import Membership, Organization, Role, User


@pytest.fixture(autouse=True)
def fresh_cache():
    """Failure counters live in the cache (Redis): every test starts with none."""
    cache.clear()
    yield
    cache.clear()


def make_member(email: str, slug: str, role: str = Role.MEMBER) -> tuple[User, Organization]:
    user = User.objects.filter(email=email).first() or User.objects.create_user(email, "pw-not-used-123")
    org, _ = Organization.objects.get_or_create(slug=slug, defaults={"name": slug.title()})
    Membership.objects.get_or_create(organization=org, user=user, defaults={"role": role})
    return user, org


def issue_one(**options) -> str:
    return codes.issue_codes(1, **options)[0].raw


@pytest.fixture
def alice(db):
    return make_member("alice@example.com", "org-a", Role.OWNER)


@pytest.fixture
def bob(db):
    return make_member("bob@example.com", "org-b", Role.OWNER)


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice[0])
    return client
