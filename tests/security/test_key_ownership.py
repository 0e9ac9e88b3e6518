"""Keys do not outlive their people. A key is either a member's (revoked when that membership or the
user goes, however it goes: console, admin, deletion) or an organization service key, made only by
owners and admins, which stays until revoked."""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from accounts.models import APIKey, Membership, Role, User

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import add_member, make_user
from .gateway_helpers import entitle, gateway_admits

pytestmark = pytest.mark.django_db


def create_in_console(client, **data) -> str:
    response = client.post(reverse("console:keys"), {"name": "k", **data})
    assert response.status_code == 200, response.content.decode()[:2000]
    return response.context["raw_key"]


@pytest.fixture
def member(org_a):
    user = make_user("member@example.com")
    add_member(org_a, user, Role.MEMBER)
    entitle(org_a)
    return user


def test_removing_a_member_revokes_their_keys(client_a, org_a, member):
    member_client = Client()
    member_client.force_login(member)
    raw = create_in_console(member_client)
    assert gateway_admits(raw)
    membership = Membership.objects.get(organization=org_a, user=member)
    client_a.post(reverse("console:member-remove", args=[membership.pk]))
    assert not Membership.objects.filter(pk=membership.pk).exists()
    assert not gateway_admits(raw)
    # Coming back does not bring the old key back.
    add_member(org_a, member)
    assert not gateway_admits(raw)


def test_leaving_through_the_admin_revokes_keys_too(client, org_a, member):
    client.force_login(member)
    raw = create_in_console(client)
    Membership.objects.get(organization=org_a, user=member).delete()  # e.g. the admin's membership delete
    assert not gateway_admits(raw)


def test_deactivating_a_user_revokes_their_keys(client, org_a, member):
    client.force_login(member)
    raw = create_in_console(client)
    root = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(root)
    client.post(f"/admin/accounts/user/{member.pk}/change/", {
        "email": member.email, "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
        "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    })  # is_active unticked
    member.refresh_from_db()
    assert not member.is_active
    assert not gateway_admits(raw)


def test_deleting_a_user_revokes_their_keys(client, org_a, member):
    client.force_login(member)
    raw = create_in_console(client)
    member.delete()
    assert not gateway_admits(raw)


def test_service_keys_outlive_their_creator(client, client_a, org_a, owner_a):
    entitle(org_a)
    raw = create_in_console(client_a, kind="service")
    assert APIKey.objects.get_by_raw(raw).kind == "service"
    second_owner = make_user("owner2@example.com")
    add_member(org_a, second_owner, Role.OWNER)
    client.force_login(second_owner)
    client.post(reverse("console:member-remove", args=[Membership.objects.get(user=owner_a).pk]))
    assert not Membership.objects.filter(user=owner_a).exists()
    owner_a.is_active = False
    owner_a.save()
    assert gateway_admits(raw)


def test_members_cannot_create_service_keys(client, org_a, member):
    client.force_login(member)
    response = client.post(reverse("console:keys"), {"name": "k", "kind": "service"})
    assert response.status_code == 400
    api = client.post(reverse("console:api-keys"), {"name": "k", "kind": "service"}, content_type="application/json")
    assert api.status_code == 400 and api.json()["error"]["param"] == "kind"
    assert not APIKey.objects.exists()


def test_api_creates_service_keys_for_managers(client_a, org_a):
    response = client_a.post(reverse("console:api-keys"), {"name": "ci", "kind": "service"}, content_type="application/json")
    assert response.status_code == 201 and response.json()["kind"] == "service"


def test_operator_command_makes_a_service_key(org_a, capsys):
    call_command("create_api_key", "--org", org_a.slug, "--name", "batch")
    assert APIKey.objects.get().kind == "service"
