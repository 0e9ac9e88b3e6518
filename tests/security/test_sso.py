"""SSO configuration: off when unset (no button, no OIDC URLs), refused when half-set, the domain map's
syntax and roles. The sign-in itself runs through a real provider in test_sso_browser.py."""

from __future__ import annotations

import pytest
from allauth.socialaccount.models import SocialAccount, SocialApp
from django.core.exceptions import ImproperlyConfigured

from accounts import sso_config
from accounts.models import Role
from accounts.sso import join_mapped_organization

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import make_user
from .sso_helpers import PROVIDER_ID, PROVIDER_NAME, derived_settings

pytestmark = pytest.mark.django_db

PROVIDER_ENV = {"SSO_OIDC_SERVER_URL": "https://idp.example:8443/realms/corp", "SSO_OIDC_CLIENT_ID": "maas",
                "SSO_OIDC_CLIENT_SECRET": "s3cret", "SSO_OIDC_PROVIDER_ID": PROVIDER_ID,
                "SSO_OIDC_PROVIDER_NAME": PROVIDER_NAME}


def configured(settings, env: dict[str, str]) -> None:
    settings.SOCIALACCOUNT_PROVIDERS = sso_config.oidc_providers(env)


def test_unset_provider_shows_no_button_and_its_urls_answer_404(client, settings):
    configured(settings, {})
    page = client.get("/accounts/login/").content.decode()
    assert "Sign in with" not in page and "single sign-on" not in page
    assert client.get(f"/accounts/oidc/{PROVIDER_ID}/login/").status_code == 404
    assert client.get(f"/accounts/oidc/{PROVIDER_ID}/login/callback/?code=x&state=y").status_code == 404


def test_a_configured_provider_shows_its_button(client, settings):
    configured(settings, PROVIDER_ENV)
    page = client.get("/accounts/login/").content.decode()
    assert f"Sign in with {PROVIDER_NAME}" in page
    assert f'href="/accounts/oidc/{PROVIDER_ID}/login/?process=login"' in page
    # "Continue" is a form (POST with CSRF), not a GET that any page could make a browser follow.
    confirm = client.get(f"/accounts/oidc/{PROVIDER_ID}/login/")
    assert confirm.status_code == 200 and 'method="post"' in confirm.content.decode()


def test_half_a_configuration_is_refused():
    with pytest.raises(ImproperlyConfigured, match="both"):
        sso_config.oidc_providers({"SSO_OIDC_SERVER_URL": "https://idp.example"})
    with pytest.raises(ImproperlyConfigured, match="both"):
        sso_config.oidc_providers({"SSO_OIDC_CLIENT_ID": "maas"})
    with pytest.raises(ImproperlyConfigured, match="not an http"):
        sso_config.oidc_providers({"SSO_OIDC_SERVER_URL": "idp.example", "SSO_OIDC_CLIENT_ID": "maas"})


def test_settings_admit_the_providers_origin_as_a_form_target():
    """"Continue" posts to the console, which redirects that submission to the provider: without its origin
    in form-action, Chromium blocks the redirect (test_sso_browser.py fails that way)."""
    derived = derived_settings(tuple(sorted(PROVIDER_ENV.items())))
    form_action = derived["CONTENT_SECURITY_POLICY"]["DIRECTIVES"]["form-action"]
    assert form_action == ["'self'", "https://idp.example:8443"]
    [app] = derived["SOCIALACCOUNT_PROVIDERS"]["openid_connect"]["APPS"]
    assert app["settings"] == {"server_url": PROVIDER_ENV["SSO_OIDC_SERVER_URL"], "oauth_pkce_enabled": True}
    assert derived["SOCIALACCOUNT_EMAIL_AUTHENTICATION"] is True
    off = derived_settings((("SSO_EMAIL_AUTHENTICATION", "0"),))
    assert off["CONTENT_SECURITY_POLICY"]["DIRECTIVES"]["form-action"] == ["'self'"]
    assert off["SOCIALACCOUNT_EMAIL_AUTHENTICATION"] is False
    assert off["SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT"] is False


def test_domain_map_syntax_and_default_role():
    assert sso_config.domain_organizations(" Acme.example=acme:admin, @corp.example=corp ,") == {
        "acme.example": {"organization": "acme", "role": "admin"},
        "corp.example": {"organization": "corp", "role": "member"},
    }
    assert sso_config.domain_organizations("") == {}
    for bad in ("acme.example", "acme.example=", "=acme", "acme.example=acme:superuser"):
        with pytest.raises(ImproperlyConfigured, match="SSO_DOMAIN_ORGANIZATIONS"):
            sso_config.domain_organizations(bad)


def test_the_maps_roles_are_the_membership_roles():
    assert set(sso_config.ROLES) == set(Role.values)


def test_the_map_never_changes_an_existing_role_nor_names_an_inactive_organization(settings, owner_a, org_a, caplog):
    settings.SSO_DOMAIN_ORGANIZATIONS = sso_config.domain_organizations("example.com=org-a:member")
    assert join_mapped_organization(owner_a, ["owner-a@example.com"]).role == Role.OWNER  # kept
    newcomer = make_user("new@example.com")
    assert join_mapped_organization(newcomer, ["someone@elsewhere.example", "new@example.com"]).role == Role.MEMBER
    org_a.is_active = False
    org_a.save()
    assert join_mapped_organization(make_user("late@example.com"), ["late@example.com"]) is None
    assert "no active organization 'org-a'" in caplog.text


def test_a_database_socialapp_is_no_way_in(client, settings):
    """Only the environment configures a provider: a row (shell, database) shows no button and its
    URLs answer 404."""
    configured(settings, {})
    SocialApp.objects.create(provider="openid_connect", provider_id="rogue", name="Rogue", client_id="x",
                             secret="y", settings={"server_url": "https://rogue.example"})
    assert "Rogue" not in client.get("/accounts/login/").content.decode()
    assert client.get("/accounts/oidc/rogue/login/").status_code == 404


def test_the_admin_shows_connections_read_only_and_no_provider_pages(client, owner_a):
    staff = make_user("root@example.com")
    staff.is_staff = staff.is_superuser = True
    staff.save()
    account = SocialAccount.objects.create(user=owner_a, provider=PROVIDER_ID, uid="owner-a-at-idp")
    client.force_login(staff)
    assert client.get("/admin/socialaccount/socialapp/").status_code == 404
    assert client.get("/admin/socialaccount/socialtoken/").status_code == 404
    assert client.get("/admin/socialaccount/socialaccount/add/").status_code == 403
    page = client.get(f"/admin/socialaccount/socialaccount/{account.pk}/change/")
    assert page.status_code == 200 and 'name="uid"' not in page.content.decode()
    client.post(f"/admin/socialaccount/socialaccount/{account.pk}/change/", {"uid": "someone-else", "user": staff.pk})
    account.refresh_from_db()
    assert (account.uid, account.user) == ("owner-a-at-idp", owner_a)
    client.post(f"/admin/socialaccount/socialaccount/{account.pk}/delete/", {"post": "yes"})
    assert not SocialAccount.objects.filter(pk=account.pk).exists()  # removing a connection is allowed
