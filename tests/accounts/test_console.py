"""Console pages, allauth flows in our layout, login throttling, create_org, Django admin, offline assets."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import pytest
from allauth.account.models import EmailAddress
from django.conf import settings
from django.core import mail
from django.core.management import CommandError, call_command
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Invitation, Membership, Organization, Role, User

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import PASSWORD, link_in_last_mail, make_user

pytestmark = pytest.mark.django_db


# ---- dashboard ----------------------------------------------------------------------------------


def test_dashboard_without_entitlement_calls_to_redeem(client_a):
    page = client_a.get(reverse("console:dashboard")).content.decode()
    assert "No active entitlement" in page
    assert f'href="{reverse("console:redeem")}"' in page and "Redeem a code" in page


def test_dashboard_shows_quota_used_remaining_validity_and_models(client_a, org_a):
    ends = timezone.now() + timedelta(days=10)
    Entitlement.objects.create(organization=org_a, token_quota=1_000_000, tokens_used=250_000, model_names=["m-a", "m-b"], ends_at=ends)
    Entitlement.objects.create(organization=org_a, token_quota=None)
    Entitlement.objects.create(organization=org_a, token_quota=777_777, revoked_at=timezone.now())  # not shown
    page = client_a.get(reverse("console:dashboard")).content.decode()
    assert "No active entitlement" not in page
    assert "1,000,000 tokens" in page and "250,000" in page and "750,000 tokens" in page
    assert "25% of the quota used" in page and "m-a, m-b" in page and ends.strftime("%Y-%m-%d") in page
    assert "Unlimited tokens" in page and "All models" in page
    assert "777,777" not in page


def test_layout_has_nav_switcher_and_logout(client_a, owner_a):
    page = client_a.get(reverse("console:dashboard")).content.decode()
    for url in ("console:dashboard", "console:redeem", "console:keys", "console:members", "console:org-new"):
        assert f'href="{reverse(url)}"' in page
    assert 'aria-current="page"' in page and 'name="viewport"' in page
    assert f'action="{reverse("account_logout")}"' in page
    response = client_a.post(reverse("account_logout"))
    assert response.status_code == 302
    assert client_a.get(reverse("console:dashboard")).status_code == 302


# ---- allauth in our layout ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["account_login", "account_signup", "account_reset_password"])
def test_allauth_pages_use_the_console_layout(client, name):
    page = client.get(reverse(name)).content.decode()
    assert "css/console.css" in page and "Skip to content" in page
    assert re.search(r'<label for="id_(email|login)"', page)


@pytest.mark.parametrize(
    "name,heading", [("account_logout", "Sign Out"), ("account_reset_password_done", "Password Reset"),
                     ("account_email_verification_sent", "Verify Your Email Address")],
)
def test_other_allauth_pages_use_the_console_layout(client_a, name, heading):
    if name != "account_logout":
        client_a.logout()
    page = client_a.get(reverse(name)).content.decode()
    assert "css/console.css" in page and "Skip to content" in page and heading in page
    if name == "account_logout":
        assert '<button class="button primary" type="submit">' in page


def test_signup_form_errors_are_shown_in_the_form(client):
    page = client.post(reverse("account_signup"), {"email": "a@example.com", "password1": "x", "password2": "y"}).content.decode()
    assert 'class="field has-error"' in page and "errorlist" in page
    assert not User.objects.exists()


def test_password_reset_flow_by_email(client):
    user = make_user("forgetful@example.com")
    client.post(reverse("account_reset_password"), {"email": "forgetful@example.com"})
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["forgetful@example.com"]
    path = urlparse(link_in_last_mail("/accounts/password/reset/key/")).path
    response = client.get(path, follow=True)
    assert response.status_code == 200 and "password1" in response.content.decode()
    new_password = "a-brand-new-password-77"
    response = client.post(response.redirect_chain[-1][0], {"password1": new_password, "password2": new_password})
    assert response.status_code == 302
    user.refresh_from_db()
    assert user.check_password(new_password)


def test_failed_logins_are_throttled(client):
    make_user("target@example.com")
    for _ in range(5):
        page = client.post(reverse("account_login"), {"login": "target@example.com", "password": "wrong"}).content.decode()
        assert "Too many failed login attempts" not in page
    # The limit (5 per 5 minutes per account) is reached: even the right password is refused for now.
    response = client.post(reverse("account_login"), {"login": "target@example.com", "password": PASSWORD})
    assert response.status_code == 200
    assert "Too many failed login attempts" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_correct_login_works_before_the_limit(client):
    make_user("fine@example.com")
    client.post(reverse("account_login"), {"login": "fine@example.com", "password": "wrong"})
    response = client.post(reverse("account_login"), {"login": "fine@example.com", "password": PASSWORD})
    assert response.status_code == 302 and "_auth_user_id" in client.session


# ---- create_org ---------------------------------------------------------------------------------


def test_create_org_creates_user_and_prints_a_working_password_link(client, capsys):
    call_command("create_org", "acme", "--owner", "Boss@Acme.example", "--name", "Acme Inc.", "--email-verified")
    out = capsys.readouterr().out
    org = Organization.objects.get(slug="acme")
    user = User.objects.get(email="boss@acme.example")
    assert org.name == "Acme Inc." and Membership.objects.get(organization=org, user=user).role == Role.OWNER
    assert not user.has_usable_password()
    link = re.search(r"https?://\S+/accounts/password/reset/key/\S+", out).group(0)
    assert link.startswith(settings.CONSOLE_BASE_URL)
    response = client.get(urlparse(link).path, follow=True)
    assert response.status_code == 200 and "password1" in response.content.decode()
    client.post(response.redirect_chain[-1][0], {"password1": "acme-owner-secret-99", "password2": "acme-owner-secret-99"})
    user.refresh_from_db()
    assert user.check_password("acme-owner-secret-99")
    client.logout()
    response = client.post(reverse("account_login"), {"login": "boss@acme.example", "password": "acme-owner-secret-99"})
    assert response.status_code == 302 and "_auth_user_id" in client.session


def test_create_org_for_existing_user_prints_no_link(owner_a, capsys):
    call_command("create_org", "second", "--owner", owner_a.email)
    out = capsys.readouterr().out
    assert "password/reset" not in out
    assert Membership.objects.get(organization__slug="second", user=owner_a).role == Role.OWNER
    assert EmailAddress.objects.get(user=owner_a).verified  # unchanged


@pytest.mark.parametrize(
    "args,message",
    [
        (["org-a", "--owner", "x@example.com"], "already exists"),
        (["bad slug!", "--owner", "x@example.com"], "slug"),
        (["fine", "--owner", "not-an-email"], "valid email"),
    ],
)
def test_create_org_errors_change_nothing(org_a, args, message):
    users, orgs = User.objects.count(), Organization.objects.count()
    with pytest.raises(CommandError, match=message):
        call_command("create_org", *args)
    assert (User.objects.count(), Organization.objects.count()) == (users, orgs)


# ---- Django admin -------------------------------------------------------------------------------


@pytest.fixture
def admin_client_(client, org_a):
    client.force_login(User.objects.create_superuser("root@example.com", PASSWORD))
    return client


def changelist(client, model: str, **query) -> set[int]:
    """The primary keys the admin changelist of `model` lists for `query` (search `q`, filters)."""
    response = client.get(reverse(f"admin:accounts_{model}_changelist"), query)
    assert response.status_code == 200
    return {obj.pk for obj in response.context["cl"].result_list}


@pytest.fixture
def two_tenants(org_a, org_b, owner_a, owner_b):
    """For each admin model, (the row of org-a, the row of org-b)."""
    import secrets

    from accounts.models import keyed_hash

    def invitation(org, email):
        return Invitation.objects.create(organization=org, email=email, token_hash=keyed_hash(secrets.token_hex()),
                                         invited_by=org.memberships.get().user, expires_at=timezone.now() + timedelta(days=1))

    manager_a = Membership.objects.get(organization=org_a, user=owner_a)
    manager_b = Membership.objects.get(organization=org_b, user=owner_b)
    return {
        "user": (owner_a.pk, owner_b.pk),
        "organization": (org_a.pk, org_b.pk),
        "membership": (manager_a.pk, manager_b.pk),
        "invitation": (invitation(org_a, "new-a@example.com").pk, invitation(org_b, "new-b@example.com").pk),
        "apikey": (APIKey.objects.create_key(org_a, "key a")[0].pk, APIKey.objects.create_key(org_b, "key b")[0].pk),
    }


@pytest.mark.parametrize("model", ["user", "organization", "membership", "invitation", "apikey"])
def test_admin_changelists_search_and_filter(admin_client_, two_tenants, model):
    row_a, row_b = two_tenants[model]
    assert {row_a, row_b} <= changelist(admin_client_, model)
    assert changelist(admin_client_, model, q="org-a") == {row_a}  # the search reaches the organization
    assert changelist(admin_client_, model, q="org-b") == {row_b}


def test_admin_filters_keep_only_the_matching_rows(admin_client_, org_a, owner_a):
    active, _ = APIKey.objects.create_key(org_a, "active")
    expired, _ = APIKey.objects.create_key(org_a, "expired", expires_at=timezone.now() - timedelta(seconds=1))
    revoked, _ = APIKey.objects.create_key(org_a, "revoked")
    revoked.revoke()
    for status, key in [("active", active), ("expired", expired), ("revoked", revoked)]:
        assert changelist(admin_client_, "apikey", status=status) == {key.pk}
    inactive = make_user("gone@example.com")
    inactive.is_active = False
    inactive.save()
    assert changelist(admin_client_, "user", is_active__exact="0") == {inactive.pk}
    assert inactive.pk not in changelist(admin_client_, "user", is_active__exact="1")


def test_admin_key_page_never_shows_or_edits_the_hash(admin_client_, org_a):
    key, raw = APIKey.objects.create_key(org_a, "admin-visible")
    page = admin_client_.get(reverse("admin:accounts_apikey_change", args=[key.pk])).content.decode()
    assert key.secret_hash not in page and raw not in page and key.redacted in page
    assert 'name="secret_hash"' not in page and 'name="public_id"' not in page
    assert admin_client_.get(reverse("admin:accounts_apikey_add")).status_code == 403
    for status in ("active", "expired", "revoked"):
        assert admin_client_.get(reverse("admin:accounts_apikey_changelist"), {"status": status}).status_code == 200


def test_admin_revoke_action(admin_client_, org_a):
    key, raw = APIKey.objects.create_key(org_a, "bad actor")
    response = admin_client_.post(
        reverse("admin:accounts_apikey_changelist"), {"action": "revoke", "_selected_action": [key.pk]}, follow=True
    )
    assert "Revoked 1 key(s)" in response.content.decode()
    assert not APIKey.objects.get_by_raw(raw).is_usable()


def test_admin_creates_user_by_email(admin_client_):
    response = admin_client_.post(
        reverse("admin:accounts_user_add"),
        {"email": "made@example.com", "usable_password": "true", "password1": "Made-by-admin-123", "password2": "Made-by-admin-123",
         "memberships-TOTAL_FORMS": "0", "memberships-INITIAL_FORMS": "0"},
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    assert User.objects.get(email="made@example.com").check_password("Made-by-admin-123")


def test_admin_organization_page_inlines_memberships(admin_client_, org_a, owner_a):
    page = admin_client_.get(reverse("admin:accounts_organization_change", args=[org_a.pk])).content.decode()
    assert owner_a.email in page and "memberships-TOTAL_FORMS" in page
    inv = Invitation.objects.create(organization=org_a, email="i@example.com", token_hash="f" * 64, expires_at=timezone.now() + timedelta(days=1))
    admin_client_.post(reverse("admin:accounts_invitation_changelist"), {"action": "revoke", "_selected_action": [inv.pk]})
    inv.refresh_from_db()
    assert inv.revoked_at is not None


# ---- offline assets -----------------------------------------------------------------------------


def test_templates_and_static_load_nothing_from_other_hosts():
    root = Path(settings.BASE_DIR)
    files = [*root.joinpath("templates").rglob("*.html"), *root.joinpath("static").rglob("*.css"), *root.joinpath("static").rglob("*.js")]
    assert files
    external = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|@import\s+url\(\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//""")
    offenders = [str(f) for f in files if external.search(f.read_text())]
    assert not offenders


def test_collectstatic_with_the_production_manifest_storage(tmp_path):
    storages = {**settings.STORAGES, "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"}}
    with override_settings(STATIC_ROOT=tmp_path, STORAGES=storages):
        call_command("collectstatic", "--noinput", verbosity=0)
    manifest = (tmp_path / "staticfiles.json").read_text()
    assert "css/console.css" in manifest and "js/console.js" in manifest
