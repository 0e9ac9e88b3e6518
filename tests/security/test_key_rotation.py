"""Rolling a key: a new secret shown once, the old one keeps working for the chosen grace period and
then stops (checked by the gateway's own admission); console and API."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts.models import APIKey, Role

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import add_member, make_user
from .gateway_helpers import entitle, gateway_admits

pytestmark = pytest.mark.django_db


@pytest.fixture
def key(org_a, owner_a):
    entitle(org_a)
    return APIKey.objects.create_key(
        org_a, "prod", created_by=owner_a, allowed_models=["m1"], requests_per_minute=7, tokens_per_minute=900,
        expires_at=timezone.now() + timedelta(days=30),
    )


def roll_api(client, pk: int, grace: int):
    return client.post(reverse("console:api-key-roll", args=[pk]), {"grace_seconds": grace}, content_type="application/json")


def test_console_roll_shows_the_new_key_once_and_keeps_the_old_one_for_the_grace(client_a, key):
    old, old_raw = key
    response = client_a.post(reverse("console:key-roll", args=[old.pk]), {"grace_seconds": "3600"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    new_raw = response.context["raw_key"]
    assert new_raw != old_raw and new_raw in response.content.decode()
    assert gateway_admits(old_raw) and gateway_admits(new_raw)
    old.refresh_from_db()
    assert abs((old.expires_at - (timezone.now() + timedelta(hours=1))).total_seconds()) < 60
    assert new_raw not in client_a.get(reverse("console:keys")).content.decode()


def test_old_key_stops_when_the_grace_period_ends(client_a, key):
    old, old_raw = key
    response = roll_api(client_a, old.pk, 1)
    assert response.status_code == 201, response.content
    new_raw = response.json()["secret"]
    assert gateway_admits(old_raw) and gateway_admits(new_raw)
    time.sleep(1.2)
    assert not gateway_admits(old_raw)
    assert gateway_admits(new_raw)


def test_no_grace_stops_the_old_key_at_once(client_a, key):
    old, old_raw = key
    new_raw = roll_api(client_a, old.pk, 0).json()["secret"]
    assert not gateway_admits(old_raw) and gateway_admits(new_raw)


def test_the_new_key_keeps_the_settings_and_owner(client_a, key, owner_a):
    old, _ = key
    body = roll_api(client_a, old.pk, 60).json()
    new = APIKey.objects.get(pk=body["id"])
    assert (new.name, new.organization_id, new.created_by, new.kind) == (old.name, old.organization_id, owner_a, old.kind)
    assert (new.allowed_models, new.requests_per_minute, new.tokens_per_minute) == (["m1"], 7, 900)
    assert new.expires_at == old.expires_at  # the original end date, not the grace
    assert new.rotated_from_id == old.pk and body["rotated_from"]["id"] == old.pk


def test_a_key_is_rolled_once(client_a, key):
    old, _ = key
    assert roll_api(client_a, old.pk, 60).status_code == 201
    again = roll_api(client_a, old.pk, 60)
    assert again.status_code == 409
    assert APIKey.objects.count() == 2


def test_grace_is_bounded(client_a, key, settings):
    old, _ = key
    settings.KEY_ROTATION_MAX_GRACE_SECONDS = 3600
    response = roll_api(client_a, old.pk, 3601)
    assert response.status_code == 400 and response.json()["error"]["param"] == "grace_seconds"
    assert roll_api(client_a, old.pk, -1).status_code == 400


def test_revoked_keys_cannot_be_rolled(client_a, key):
    old, _ = key
    old.revoke()
    assert roll_api(client_a, old.pk, 60).status_code == 409


def test_members_roll_only_their_own_keys(client, key, org_a):
    old, _ = key
    member = make_user("member@example.com")
    add_member(org_a, member, Role.MEMBER)
    client.force_login(member)
    assert roll_api(client, old.pk, 60).status_code == 403
    own, _ = APIKey.objects.create_key(org_a, "mine", created_by=member)
    assert roll_api(client, own.pk, 60).status_code == 201


def test_another_organizations_key_is_not_found(client, key, org_b, owner_b):
    old, _ = key
    client.force_login(owner_b)
    assert roll_api(client, old.pk, 60).status_code == 404
    assert client.post(f"/keys/{old.pk}/roll/", {"grace_seconds": "60"}).status_code == 404
