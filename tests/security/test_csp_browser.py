"""Every console and admin page carries a Content-Security-Policy without 'unsafe-inline' scripts, and
a real browser (headless Chromium) reports no violation of it on any of them."""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from accounts import codes
from accounts.models import APIKey, Entitlement, User
from tests.ci import IN_CI, chromium_missing

from ..accounts import test_browser
from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import make_org, make_user

browser_page = test_browser.browser_page  # the headless Chromium fixture

pytestmark = [
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True),
    # In CI (CI=true) a missing browser fails instead: tests/conftest.py.
    pytest.mark.skipif(chromium_missing() and not IN_CI, reason="Chromium is installed by `make services`"),
]

CONSOLE_PAGES = ["/", "/keys/", "/members/", "/redeem/", "/usage/", "/organizations/new/", "/accounts/email/",
                 "/accounts/2fa/", "/accounts/2fa/totp/activate/",
                 "/accounts/password/change/", "/organization/", "/organization/audit/"]
ANONYMOUS_PAGES = ["/accounts/login/", "/accounts/signup/", "/accounts/password/reset/"]
ADMIN_PAGES = ["/admin/", "/admin/accounts/apikey/", "/admin/accounts/user/", "/admin/accounts/authorizationcode/",
               "/admin/accounts/authorizationcode/generate/", "/admin/inference/deployment/add/",
               "/admin/pghistory/middlewareevents/"]

WATCH = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
  e => window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline') + ' ' + e.sourceFile + ':' + e.lineNumber));
"""


def test_csp_header_has_no_inline_script(client):
    header = client.get("/accounts/login/")["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in header.split(";") if d.strip())
    assert directives["script-src"] == "'self'" and "unsafe" not in header
    assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"


def login_cookie(page, live_server, user: User) -> None:
    client = Client()
    client.force_login(user)
    page.context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
                               "url": live_server.url}])


def visit(page, live_server, path: str) -> list[str]:
    response = page.goto(f"{live_server.url}{path}")
    assert response.status == 200, (path, response.status)
    assert response.headers.get("content-security-policy"), path
    page.wait_for_load_state("load")
    # Exercise the console's script (copy button, confirmations) where it is on the page.
    return page.evaluate("window.__csp")


def test_console_and_admin_pages_raise_no_violation(live_server, browser_page):
    page = browser_page
    messages: list[str] = []
    page.on("console", lambda m: messages.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script(WATCH)
    for path in ANONYMOUS_PAGES:
        assert visit(page, live_server, path) == [], path

    owner = make_user("csp-owner@example.com")
    org = make_org(owner, "csp-org")
    Entitlement.objects.create(organization=org, token_quota=1000)
    APIKey.objects.create_key(org, "listed key", created_by=owner)
    login_cookie(page, live_server, owner)
    for path in CONSOLE_PAGES:
        assert visit(page, live_server, path) == [], path
    # The one-time reveal and its Copy button (console.js).
    page.goto(f"{live_server.url}/keys/")
    page.get_by_label("Name").fill("csp key")
    page.get_by_role("button", name="Create key").click()
    page.get_by_role("button", name="Copy").click()
    assert page.evaluate("window.__csp") == []

    root = User.objects.create_superuser("csp-root@example.com", "pw-not-used-123")
    codes.issue_codes(1, token_quota=10)
    page.context.clear_cookies()
    login_cookie(page, live_server, root)
    for path in ADMIN_PAGES:
        assert visit(page, live_server, path) == [], path
    # The generator's one-time page (codes in a monospace box, CSV download link).
    page.goto(f"{live_server.url}/admin/accounts/authorizationcode/generate/")
    page.locator("#id_count").fill("2")
    page.locator("#content-main form [type=submit]").first.click()
    page.locator("#issued-codes").wait_for()
    assert page.evaluate("getComputedStyle(document.querySelector('#issued-codes')).fontFamily") == "monospace"
    assert page.evaluate("window.__csp") == []
    assert messages == []
