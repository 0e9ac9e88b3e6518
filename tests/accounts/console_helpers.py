"""Fixtures and helpers shared by the console tests (tests/accounts/test_tenancy*, test_keys*, test_console*)."""

from __future__ import annotations

import re

import pytest
from allauth.account.models import EmailAddress
from django.core import mail
from django.core.cache import cache

from accounts import tenancy
from accounts.models import Membership, Organization, Role, User

PASSWORD = "correct-horse-battery-staple-42"


@pytest.fixture(autouse=True)
def fresh_cache():
    """allauth's rate limits and the redemption counters live in the cache (Redis): start clean."""
    cache.clear()
    yield
    cache.clear()


def make_user(email: str, verified: bool = True) -> User:
    user = User.objects.create_user(email, PASSWORD)
    EmailAddress.objects.create(user=user, email=email, primary=True, verified=verified)
    return user


def make_org(owner: User, slug: str) -> Organization:
    return tenancy.create_organization(owner, name=slug.replace("-", " ").title(), slug=slug)


def add_member(org: Organization, user: User, role: str = Role.MEMBER) -> Membership:
    return Membership.objects.create(organization=org, user=user, role=role)


def link_in_last_mail(pattern: str) -> str:
    body = mail.outbox[-1].body
    match = re.search(rf"https?://[^\s]*{pattern}[^\s]*", body)
    assert match, f"no link matching {pattern!r} in:\n{body}"
    return match.group(0)


@pytest.fixture
def owner_a(db) -> User:
    return make_user("owner-a@example.com")


@pytest.fixture
def org_a(owner_a) -> Organization:
    return make_org(owner_a, "org-a")


@pytest.fixture
def owner_b(db) -> User:
    return make_user("owner-b@example.com")


@pytest.fixture
def org_b(owner_b) -> Organization:
    return make_org(owner_b, "org-b")


@pytest.fixture
def client_a(client, owner_a, org_a):
    client.force_login(owner_a)
    return client


def start_console_gateway(**env: str):
    """The gateway process (tests/inference/conftest.py) on this run's own Redis database (REDIS_URL),
    flushed first: rate-limit buckets of another run (same organization ids) never leak in."""
    import os

    import redis

    from tests.inference.conftest import start_gateway

    url = os.environ["REDIS_URL"]
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return start_gateway(REDIS_URL=url, **env)
