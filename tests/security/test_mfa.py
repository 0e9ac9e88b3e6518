"""Staff have a second factor and one way in: /admin/login/ hands over to the (rate-limited, MFA-aware)
allauth login; a staff member without an authenticator must set up TOTP before anything else; with one,
the login asks for a TOTP code or a single-use recovery code. Users may enable it; nothing forces them."""

from __future__ import annotations

import time

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.recovery_codes.internal.auth import RecoveryCodes
from allauth.mfa.totp.internal.auth import TOTP, format_hotp_value, generate_totp_secret, hotp_value
from django.test import Client

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import PASSWORD, make_org, make_user

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"
AUTHENTICATE = "/accounts/2fa/authenticate/"
ACTIVATE = "/accounts/2fa/totp/activate/"
REAUTHENTICATE = "/accounts/reauthenticate/"


def totp_code(secret: str) -> str:
    return format_hotp_value(hotp_value(secret, int(time.time()) // 30))


def logged_in(client) -> bool:
    return "_auth_user_id" in client.session


@pytest.fixture
def staff(db):
    user = make_user("staff@example.com")
    user.is_staff = True
    user.is_superuser = True
    user.save()
    make_org(user, "staff-org")
    return user


def password_login(client, email: str, password: str = PASSWORD):
    return client.post(LOGIN, {"login": email, "password": password})


def test_admin_login_form_never_checks_a_password(client, staff):
    response = client.post("/admin/login/?next=/admin/", {"username": staff.email, "password": PASSWORD})
    assert not logged_in(client)
    assert response.status_code == 302 and response["Location"].startswith(LOGIN)
    assert client.get("/admin/").status_code == 302


def test_staff_login_is_rate_limited(client, staff):
    """The one login form staff have (test above) is allauth's, with its failed-login limit."""
    for _ in range(5):
        password_login(client, staff.email, "wrong-password-123")
    refused = password_login(client, staff.email)
    assert "Too many failed login attempts" in refused.content.decode()
    assert not logged_in(client)


def reauthenticate(client):
    """allauth asks for the password again before an authenticator is added."""
    assert client.get(ACTIVATE)["Location"].startswith(REAUTHENTICATE)
    client.post(REAUTHENTICATE, {"password": PASSWORD})


def test_staff_without_an_authenticator_must_set_up_totp_first(client, staff):
    response = password_login(client, staff.email)
    assert logged_in(client)
    assert response.status_code == 302
    for path in ("/admin/", "/", "/keys/"):
        blocked = client.get(path)
        assert blocked.status_code == 302 and blocked["Location"].startswith(ACTIVATE), path
    reauthenticate(client)
    assert client.get(ACTIVATE).status_code == 200
    secret = client.session["mfa.totp.secret"]
    assert client.post(ACTIVATE, {"code": "000000" if totp_code(secret) != "000000" else "111111"}).status_code == 200
    assert not Authenticator.objects.filter(user=staff).exists()
    client.post(ACTIVATE, {"code": totp_code(secret)})
    assert Authenticator.objects.filter(user=staff, type=Authenticator.Type.TOTP).exists()
    assert Authenticator.objects.filter(user=staff, type=Authenticator.Type.RECOVERY_CODES).exists()
    assert client.get("/admin/").status_code == 200


@pytest.fixture
def staff_with_totp(staff):
    secret = generate_totp_secret()
    TOTP.activate(staff, secret)
    codes = RecoveryCodes.activate(staff).get_unused_codes()
    return staff, secret, codes


def test_staff_with_totp_is_asked_for_the_code(staff_with_totp):
    staff, secret, _ = staff_with_totp
    client = Client()
    response = password_login(client, staff.email)
    assert response["Location"].startswith(AUTHENTICATE)
    assert not logged_in(client)
    assert client.get("/admin/").status_code == 302
    client.post(AUTHENTICATE, {"code": "12345x"})
    assert not logged_in(client)
    client.post(AUTHENTICATE, {"code": totp_code(secret)})
    assert logged_in(client)
    assert client.get("/admin/").status_code == 200


def test_a_recovery_code_signs_in_once(staff_with_totp):
    staff, _, codes = staff_with_totp
    first = Client()
    password_login(first, staff.email)
    first.post(AUTHENTICATE, {"code": codes[0]})
    assert logged_in(first)
    second = Client()
    password_login(second, staff.email)
    second.post(AUTHENTICATE, {"code": codes[0]})
    assert not logged_in(second)


def test_users_are_not_forced_but_may_enable_it(client, owner_a, org_a):
    password_login(client, owner_a.email)
    assert logged_in(client)
    assert client.get("/").status_code == 200
    reauthenticate(client)
    assert client.get(ACTIVATE).status_code == 200
    secret = client.session["mfa.totp.secret"]
    client.post(ACTIVATE, {"code": totp_code(secret)})
    assert Authenticator.objects.filter(user=owner_a, type=Authenticator.Type.TOTP).exists()
