"""Security keys (WebAuthn) as a second factor, in headless Chromium with a virtual authenticator (Chrome
DevTools Protocol `WebAuthn` domain): registered from the account's two-factor pages, then asked for at
the next login; a key alone satisfies an organization's MFA requirement."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from allauth.mfa.models import Authenticator

from ..accounts import test_browser
from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import PASSWORD, make_org, make_user

browser_page = test_browser.browser_page  # the headless Chromium fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(test_browser.CHROMIUM).exists(), reason="Chromium is installed by `make services`"),
]


def virtual_authenticator(page):
    """A platform authenticator that verifies the user and answers at once (no touch to wait for)."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("WebAuthn.enable", {"enableUI": False})
    options = {"protocol": "ctap2", "transport": "internal", "hasResidentKey": True, "hasUserVerification": True,
               "isUserVerified": True, "automaticPresenceSimulation": True}
    authenticator_id = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": options})["authenticatorId"]
    return cdp, authenticator_id


def password_login(page, live_server, email: str) -> None:
    page.goto(f"{live_server.url}/accounts/login/")
    page.get_by_label("Email").fill(email)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign In").click()


def test_a_security_key_is_registered_then_required_at_login(live_server, browser_page):
    user = make_user("keyholder@example.com")
    org = make_org(user, "key-org")
    page = browser_page
    cdp, authenticator_id = virtual_authenticator(page)

    def register():
        password_login(page, live_server, user.email)
        page.wait_for_url(f"{live_server.url}/")
        page.goto(f"{live_server.url}/accounts/2fa/webauthn/add/")
        page.wait_for_url(re.compile(r"/accounts/reauthenticate/"))  # allauth: the password again first
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Confirm").click()
        page.wait_for_url(re.compile(r"/accounts/2fa/webauthn/add/"))
        page.get_by_label("Name").fill("laptop key")
        page.get_by_role("button", name="Add").click()
        page.wait_for_url(lambda url: "/webauthn/add/" not in url)

    walk(page, register)
    key = Authenticator.objects.get(user=user, type=Authenticator.Type.WEBAUTHN)
    assert key.wrap().name == "laptop key"
    [credential] = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator_id})["credentials"]
    assert credential["rpId"] == "localhost"
    assert Authenticator.objects.filter(user=user, type=Authenticator.Type.RECOVERY_CODES).exists()

    org.require_mfa = True  # the key alone is a second factor: the member is not sent to set up TOTP
    org.save()

    def log_in_with_the_key():
        page.locator("form.logout button").click()
        page.wait_for_url(re.compile(r"/accounts/login/"))
        password_login(page, live_server, user.email)
        page.wait_for_url(re.compile(r"/accounts/2fa/authenticate/$"))
        assert page.locator("form.logout").count() == 0  # not signed in before the key answers
        page.get_by_role("button", name="Use a security key").click()
        page.wait_for_url(f"{live_server.url}/")
        page.goto(f"{live_server.url}/keys/")
        assert page.url == f"{live_server.url}/keys/"
        assert page.locator("form.logout button").get_attribute("title") == f"Log out {user.email}"

    walk(page, log_in_with_the_key)
    [used] = cdp.send("WebAuthn.getCredentials", {"authenticatorId": authenticator_id})["credentials"]
    assert used["signCount"] > credential["signCount"]  # the login was the key's signature


def walk(page, steps):
    try:
        steps()
    except BaseException:
        print("URL:", page.url)
        print(page.content()[:4000])
        raise
