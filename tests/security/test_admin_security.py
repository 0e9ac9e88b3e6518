"""Django admin is least-privilege: actions need the permission they exercise, staff cannot promote
themselves, the engine token is write-only, and billing rows are append-only."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, Permission
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Invitation, Organization, User
from inference.models import AIModel, Deployment, Reservation, UsageRecord

pytestmark = pytest.mark.django_db

TOKEN = "engine-token-that-must-never-be-shown-7f3b"


def staff_with(client, *codenames: str) -> User:
    user = User.objects.create_user("staff@example.com", "pw-not-used-123", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client.force_login(user)
    return user


@pytest.fixture
def org(db) -> Organization:
    return Organization.objects.create(name="Acme", slug="acme")


@pytest.fixture
def deployment(db) -> Deployment:
    model = AIModel.objects.create(name="smollm2")
    return Deployment.objects.create(model=model, base_url="http://127.0.0.1:9", internal_token=TOKEN)


def run_action(client, url: str, action: str, pk: int):
    return client.post(url, {"action": action, "_selected_action": [pk]})


def test_view_only_staff_cannot_revoke_invitations(client, org):
    invitation = Invitation.objects.create(organization=org, email="x@example.com", token_hash="h" * 64,
                                           expires_at=timezone.now() + timedelta(days=1))
    staff_with(client, "view_invitation")
    run_action(client, "/admin/accounts/invitation/", "revoke", invitation.pk)
    invitation.refresh_from_db()
    assert invitation.revoked_at is None


def test_view_only_staff_cannot_revoke_keys(client, org):
    key, raw = APIKey.objects.create_key(org, "prod")
    staff_with(client, "view_apikey")
    run_action(client, "/admin/accounts/apikey/", "revoke", key.pk)
    key.refresh_from_db()
    assert key.revoked_at is None


def test_view_only_staff_cannot_run_health_checks(client, deployment):
    staff_with(client, "view_deployment")
    run_action(client, "/admin/inference/deployment/", "check_health", deployment.pk)
    deployment.refresh_from_db()
    assert deployment.last_checked_at is None


def test_staff_with_change_permission_can_revoke_keys(client, org):
    key, raw = APIKey.objects.create_key(org, "prod")
    staff_with(client, "view_apikey", "change_apikey")
    run_action(client, "/admin/accounts/apikey/", "revoke", key.pk)
    key.refresh_from_db()
    assert key.revoked_at is not None


def test_staff_cannot_make_themselves_superuser(client):
    me = staff_with(client, "view_user", "change_user")
    every = Permission.objects.get(codename="delete_user")
    group = Group.objects.create(name="powerful")
    page = client.get(f"/admin/accounts/user/{me.pk}/change/").content.decode()
    assert 'name="is_superuser"' not in page and 'name="user_permissions"' not in page and 'name="groups"' not in page
    client.post(f"/admin/accounts/user/{me.pk}/change/", {
        "email": me.email, "is_active": "on", "is_staff": "on", "is_superuser": "on",
        "groups": [group.pk], "user_permissions": [every.pk], "date_joined_0": "2026-01-01", "date_joined_1": "00:00:00",
        "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    })
    me.refresh_from_db()
    assert not me.is_superuser
    assert not me.groups.exists()
    assert not me.user_permissions.filter(pk=every.pk).exists()


def test_staff_cannot_make_another_user_staff_or_take_over_a_superuser(client):
    staff_with(client, "view_user", "change_user")
    other = User.objects.create_user("other@example.com", "pw-not-used-123")
    root = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.post(f"/admin/accounts/user/{other.pk}/change/", {
        "email": other.email, "is_active": "on", "is_staff": "on", "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00", "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    })
    other.refresh_from_db()
    assert not other.is_staff
    response = client.post(f"/admin/accounts/user/{root.pk}/password/",
                           {"password1": "a-new-password-42x", "password2": "a-new-password-42x", "usable_password": "true"})
    root.refresh_from_db()
    assert response.status_code == 403
    assert root.check_password("pw-not-used-123")


def test_superuser_still_grants_staff(client):
    root = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(root)
    other = User.objects.create_user("other@example.com", "pw-not-used-123")
    client.post(f"/admin/accounts/user/{other.pk}/change/", {
        "email": other.email, "is_active": "on", "is_staff": "on", "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00", "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0",
    })
    other.refresh_from_db()
    assert other.is_staff


def test_staff_cannot_edit_groups(client):
    staff_with(client, "view_group", "change_group", "add_group")
    client.post("/admin/auth/group/add/", {"name": "mine", "permissions": list(Permission.objects.values_list("pk", flat=True))})
    assert not Group.objects.filter(name="mine").exists()


def test_deployment_token_is_write_only(client, deployment):
    root = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(root)
    for url in (f"/admin/inference/deployment/{deployment.pk}/change/", f"/admin/inference/aimodel/{deployment.model_id}/change/"):
        page = client.get(url).content.decode()
        assert TOKEN not in page, url
    # Saving the form without typing a token keeps the stored one; typing one replaces it.
    data = {"model": deployment.model_id, "base_url": deployment.base_url, "served_model_name": "", "internal_token": "",
            "kind": "engine", "weight": "1", "enabled": "on"}
    client.post(f"/admin/inference/deployment/{deployment.pk}/change/", data)
    deployment.refresh_from_db()
    assert deployment.internal_token == TOKEN
    client.post(f"/admin/inference/deployment/{deployment.pk}/change/", {**data, "internal_token": "new-token-123"})
    deployment.refresh_from_db()
    assert deployment.internal_token == "new-token-123"
    client.post(f"/admin/inference/deployment/{deployment.pk}/change/", {**data, "clear_internal_token": "on"})
    deployment.refresh_from_db()
    assert deployment.internal_token == ""


def test_upstream_api_key_is_stored_encrypted_and_never_shown(client, deployment):
    root = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(root)
    url = f"/admin/inference/deployment/{deployment.pk}/change/"
    data = {"model": deployment.model_id, "base_url": deployment.base_url, "kind": "openai", "weight": "1",
            "enabled": "on", "api_key": "sk-provider-key-never-shown-91c2"}
    client.post(url, data)
    deployment.refresh_from_db()
    assert deployment.kind == "openai" and deployment.api_key == "sk-provider-key-never-shown-91c2"
    assert "sk-provider" not in deployment.api_key_encrypted  # at rest: Fernet ciphertext only
    assert deployment.bearer_token == "sk-provider-key-never-shown-91c2"  # the key replaces the internal token
    for page_url in (url, f"/admin/inference/aimodel/{deployment.model_id}/change/"):
        page = client.get(page_url).content.decode()
        assert "sk-provider" not in page and deployment.api_key_encrypted not in page, page_url
    client.post(url, {**data, "api_key": ""})  # left empty: kept
    deployment.refresh_from_db()
    assert deployment.api_key == "sk-provider-key-never-shown-91c2"
    client.post(url, {**data, "api_key": "", "clear_api_key": "on"})
    deployment.refresh_from_db()
    assert deployment.api_key_encrypted == "" and deployment.bearer_token == TOKEN


def test_draining_is_an_admin_action_that_needs_the_change_permission(client, deployment):
    staff_with(client, "view_deployment")
    run_action(client, "/admin/inference/deployment/", "start_draining", deployment.pk)
    deployment.refresh_from_db()
    assert not deployment.draining
    client.logout()
    User.objects.filter(email="staff@example.com").delete()
    staff_with(client, "view_deployment", "change_deployment")
    run_action(client, "/admin/inference/deployment/", "start_draining", deployment.pk)
    deployment.refresh_from_db()
    assert deployment.draining


def test_billing_rows_cannot_be_deleted_or_edited_by_anyone(client, org):
    root = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(root)
    entitlement = Entitlement.objects.create(organization=org, token_quota=1000, tokens_reserved=100)
    reservation = Reservation.objects.create(organization=org, entitlement=entitlement, tokens=100, request_id="r1",
                                             expires_at=timezone.now() + timedelta(minutes=5))
    record = UsageRecord.objects.create(organization=org, model_name="m", endpoint="chat", status="ok", http_status=200,
                                        latency_ms=1.0, request_id="r0")
    for url, pk in (("/admin/inference/usagerecord/", record.pk), ("/admin/inference/reservation/", reservation.pk)):
        assert client.post(f"{url}{pk}/delete/", {"post": "yes"}).status_code == 403
        run_action(client, url, "delete_selected", pk)
        assert client.post(f"{url}{pk}/change/", {"tokens": "1", "request_id": "changed"}).status_code == 403
    assert UsageRecord.objects.filter(pk=record.pk).exists()
    assert Reservation.objects.get(pk=reservation.pk).tokens == 100
    entitlement.refresh_from_db()
    assert entitlement.tokens_reserved == 100
