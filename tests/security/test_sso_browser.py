"""Single sign-on end to end: headless Chromium walks OpenID Connect's authorization-code flow (with PKCE)
from the console's login page through a real provider (django-oauth-toolkit in its own process: its login
form, its consent page) back to the console, signed in. The console's SSO settings are those
maas/settings.py derives from SSO_* variables naming that provider."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from allauth.account.models import EmailAddress
from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret
from allauth.socialaccount.models import SocialAccount

from accounts.models import Membership, MembershipEvent, Role, User

from ..accounts import test_browser
from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import make_org, make_user
from .sso_helpers import IDP_PASSWORD, PROVIDER_ID, PROVIDER_NAME, configure_sso, oidc_provider  # noqa: F401
from .test_mfa import totp_code

browser_page = test_browser.browser_page  # the headless Chromium fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(test_browser.CHROMIUM).exists(), reason="Chromium is installed by `make services`"),
]

CALLBACK = f"/accounts/oidc/{PROVIDER_ID}/login/callback/"


@pytest.fixture
def acme(db):
    """The organization acme.example's people join, as admins (SSO_DOMAIN_ORGANIZATIONS)."""
    return make_org(make_user("founder@acme.example"), "acme")


@pytest.fixture
def sso(settings, oidc_provider, acme):  # noqa: F811
    configure_sso(settings, oidc_provider.environment(SSO_DOMAIN_ORGANIZATIONS="acme.example=acme:admin"))
    return oidc_provider


def sso_sign_in(page, live_server, username: str, *, consent: bool = True) -> None:
    """Console login → "Sign in with Corp IdP" → Continue → the provider's login form → its consent page."""
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}").click()
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url(re.compile(r"^http://127\.0\.0\.1:\d+/login/"))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(IDP_PASSWORD)
    page.get_by_role("button", name="Sign in to the provider").click()
    page.get_by_role("heading", name=re.compile(r"^Authorize")).wait_for()
    page.get_by_role("button", name="Authorize" if consent else "Deny").click()


def signed_in_as(page, live_server) -> str | None:
    """The email the console's session belongs to, read from its pages (None: no one is signed in)."""
    page.goto(f"{live_server.url}/keys/")
    logout = page.locator("form.logout button")
    return logout.get_attribute("title").removeprefix("Log out ") if logout.count() else None


def walk(page, check):
    try:
        check()
    except BaseException:
        print("URL:", page.url)
        print(page.content()[:4000])
        raise


def test_sso_signs_in_and_joins_the_mapped_organization_with_its_role(live_server, browser_page, sso, acme):
    def check():
        sso_sign_in(browser_page, live_server, "alice")
        browser_page.wait_for_url(f"{live_server.url}/")
        assert browser_page.locator(".org-name").inner_text() == acme.name
        assert signed_in_as(browser_page, live_server) == "alice@acme.example"

    walk(browser_page, check)
    user = User.objects.get(email="alice@acme.example")
    account = SocialAccount.objects.get(user=user)
    assert account.provider == PROVIDER_ID and account.extra_data["userinfo"]["preferred_username"] == "alice"
    assert EmailAddress.objects.filter(user=user, email=user.email, verified=True).exists()
    assert not user.has_usable_password()
    membership = Membership.objects.get(user=user)  # the mapped organization, and no personal one
    assert membership.organization == acme and membership.role == Role.ADMIN
    event = MembershipEvent.objects.get(pgh_obj_id=membership.pk, pgh_label="insert")
    assert event.role == Role.ADMIN and event.organization_id == acme.pk
    assert event.pgh_context.metadata["url"] == CALLBACK and event.pgh_context.metadata["ip"] == "127.0.0.1"


def test_another_domain_gets_its_own_organization_and_no_membership_in_the_mapped_one(
        live_server, browser_page, sso, acme):
    walk(browser_page, lambda: (sso_sign_in(browser_page, live_server, "bob"),
                                browser_page.wait_for_url(f"{live_server.url}/")))
    assert signed_in_as(browser_page, live_server) == "bob@other.example"
    user = User.objects.get(email="bob@other.example")
    assert not Membership.objects.filter(user=user, organization=acme).exists()
    assert Membership.objects.get(user=user).role == Role.OWNER  # the personal organization a sign-up gets


def test_an_unverified_email_maps_to_nothing_and_must_be_verified(live_server, browser_page, sso, acme):
    """The provider does not vouch for mallory@acme.example: no membership, and the console's own email
    verification (ACCOUNT_EMAIL_VERIFICATION) applies before any sign-in."""
    walk(browser_page, lambda: (sso_sign_in(browser_page, live_server, "mallory"),
                                browser_page.wait_for_url(re.compile(r"/accounts/confirm-email/$"))))
    assert signed_in_as(browser_page, live_server) is None
    user = User.objects.get(email="mallory@acme.example")
    assert not Membership.objects.filter(user=user, organization=acme).exists()
    assert not EmailAddress.objects.get(user=user).verified


def test_an_existing_account_with_totp_is_connected_after_its_second_factor(live_server, browser_page, sso, acme):
    """carol@acme.example already has a local account (verified email, TOTP): SSO signs in to it (same user,
    the SSO account connected) only once the console's second factor is given."""
    carol = make_user("carol@acme.example")
    secret = generate_totp_secret()
    TOTP.activate(carol, secret)

    def check():
        sso_sign_in(browser_page, live_server, "carol")
        browser_page.wait_for_url(re.compile(r"/accounts/2fa/authenticate/$"))
        assert browser_page.locator("form.logout").count() == 0  # not signed in yet
        browser_page.get_by_label("Code").fill(totp_code(secret))
        browser_page.get_by_role("button", name="Sign In").click()
        browser_page.wait_for_url(f"{live_server.url}/")
        assert signed_in_as(browser_page, live_server) == carol.email

    walk(browser_page, check)
    assert User.objects.filter(email=carol.email).count() == 1
    assert SocialAccount.objects.get(provider=PROVIDER_ID).user == carol
    assert Membership.objects.get(user=carol, organization=acme).role == Role.ADMIN


def test_organization_enforced_mfa_holds_an_sso_member_until_totp_is_set_up(live_server, browser_page, sso, acme):
    """An SSO account has no password: allauth confirms it is them with a code mailed to the verified
    address before the authenticator is added."""
    acme.require_mfa = True
    acme.save()

    def check():
        sso_sign_in(browser_page, live_server, "alice")
        browser_page.wait_for_url(re.compile(r"/accounts/reauthenticate/code/\?next=%2Faccounts%2F2fa%2Ftotp%2Factivate%2F$"))
        browser_page.goto(f"{live_server.url}/keys/")  # every console page sends to the set-up
        assert "next=%2Faccounts%2F2fa%2Ftotp%2Factivate%2F" in browser_page.url
        browser_page.get_by_role("button", name="Request Code").click()
        code = re.search(r"\n\n(\S+)\n\n", test_browser.wait_for_mail(1).body).group(1)
        browser_page.get_by_label("Code").fill(code)
        browser_page.get_by_role("button", name=re.compile("Confirm|Sign In")).click()
        browser_page.wait_for_url(f"{live_server.url}/accounts/2fa/totp/activate/")
        assert browser_page.get_by_label("Authenticator code").is_visible()

    walk(browser_page, check)


def test_denied_consent_shows_why_and_signs_nobody_in(live_server, browser_page, sso):
    def check():
        sso_sign_in(browser_page, live_server, "alice", consent=False)
        browser_page.get_by_role("heading", name="Sign-in cancelled").wait_for()
        assert "consent was denied" in browser_page.get_by_role("alert").inner_text()

    walk(browser_page, check)
    assert signed_in_as(browser_page, live_server) is None
    assert not User.objects.filter(email="alice@acme.example").exists()


def test_a_provider_refusing_the_code_exchange_shows_an_error_and_signs_nobody_in(
        live_server, browser_page, settings, oidc_provider, acme):  # noqa: F811
    """The console holds a wrong client secret: the provider signs the user in and asks for consent, then
    refuses the console's token request (invalid_client)."""
    configure_sso(settings, oidc_provider.environment(SSO_OIDC_CLIENT_SECRET="not-the-secret"))

    def check():
        sso_sign_in(browser_page, live_server, "alice")
        browser_page.get_by_role("heading", name="Single sign-on failed").wait_for()
        assert "You are not signed in" in browser_page.get_by_role("alert").inner_text()

    walk(browser_page, check)
    assert signed_in_as(browser_page, live_server) is None
    assert not User.objects.filter(email="alice@acme.example").exists()


def test_without_email_authentication_a_local_accounts_email_is_not_taken_over(
        live_server, browser_page, settings, oidc_provider, acme):  # noqa: F811
    carol = make_user("carol@acme.example")
    configure_sso(settings, oidc_provider.environment(SSO_EMAIL_AUTHENTICATION="0"))

    """allauth neither signs in nor says the address is taken (no enumeration): the browser sees "verify
    your email", the address's owner gets an "account already exists" mail."""

    def check():
        sso_sign_in(browser_page, live_server, "carol")
        browser_page.wait_for_url(re.compile(r"/accounts/confirm-email/$"))

    walk(browser_page, check)
    notice = test_browser.wait_for_mail(1)
    assert notice.to == [carol.email] and "already" in notice.subject.lower() + notice.body.lower()
    assert signed_in_as(browser_page, live_server) is None
    assert not SocialAccount.objects.exists() and User.objects.filter(email=carol.email).count() == 1
    carol.refresh_from_db()
    assert carol.has_usable_password()
