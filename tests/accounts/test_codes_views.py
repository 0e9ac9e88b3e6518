"""The console redeem page and the redeem/entitlement API: every outcome, CSRF, limits, tenant isolation."""

from __future__ import annotations

import datetime as dt

import pytest
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from accounts import codes
from accounts.models import AuthorizationCode, Entitlement, Membership

from .codes_fixtures import *  # noqa: F403  (fixtures)
from .codes_fixtures import issue_one, make_member

pytestmark = pytest.mark.django_db

REDEEM = "/redeem/"
API = "/api/redeem"


def expired_code() -> str:
    raw = issue_one(expires_at=timezone.now() + dt.timedelta(hours=1))
    AuthorizationCode.objects.filter(prefix=raw[:12]).update(expires_at=timezone.now() - dt.timedelta(minutes=1))
    return raw


def revoked_code() -> str:
    raw = issue_one()
    codes.revoke_code(AuthorizationCode.objects.get(prefix=raw[:12]))
    return raw


def used_up_code() -> str:
    raw = issue_one()
    user, org = make_member("other@example.com", "other-org")
    codes.redeem(org, raw, user)
    return raw


# Each bad outcome: (make the code, console message fragment, API status, API code).
OUTCOMES = {
    "unknown": (lambda: "mac-00000000-" + "a" * 26, "does not exist", 404, "unknown_code"),
    "malformed": (lambda: "not a code", "does not exist", 404, "unknown_code"),
    "expired": (expired_code, "has expired", 400, "code_expired"),
    "revoked": (revoked_code, "has been revoked", 400, "code_revoked"),
    "used_up": (used_up_code, "maximum number of times", 409, "code_used_up"),
}


def test_redeem_page_renders_for_member(alice_client):
    response = alice_client.get(REDEEM)
    assert response.status_code == 200
    assert b"Redeem an authorization code" in response.content
    assert b"None yet" in response.content


def test_redeem_page_requires_login(client):
    response = client.get(REDEEM)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]


def test_console_redeem_success_shows_entitlement(alice_client, alice):
    raw = issue_one(token_quota=1234, validity_days=7, model_names=["smollm2"])
    response = alice_client.post(REDEEM, {"code": raw}, follow=True)
    assert response.status_code == 200
    assert "Code redeemed: 1,234 tokens" in response.content.decode()
    assert raw[:12].encode() in response.content
    entitlement = Entitlement.objects.get()
    assert entitlement.organization == alice[1] and entitlement.token_quota == 1234


@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_console_redeem_failures_are_form_errors_and_change_nothing(alice_client, alice, outcome):
    make, fragment, _, _ = OUTCOMES[outcome]
    raw = make()
    before = (Entitlement.objects.count(), list(AuthorizationCode.objects.values_list("redemption_count", flat=True)))
    response = alice_client.post(REDEEM, {"code": raw})
    assert response.status_code == 400
    assert any(fragment in error for error in response.context["form"].errors["code"])
    assert fragment in response.content.decode()
    assert not Entitlement.objects.for_org(alice[1]).exists()
    after = (Entitlement.objects.count(), list(AuthorizationCode.objects.values_list("redemption_count", flat=True)))
    assert after == before


def test_console_already_redeemed_and_empty(alice_client, alice):
    raw = issue_one(max_redemptions=5)
    alice_client.post(REDEEM, {"code": raw})
    response = alice_client.post(REDEEM, {"code": raw})
    assert "already redeemed this authorization code" in response.context["form"].errors["code"][0]
    response = alice_client.post(REDEEM, {"code": "   "})
    assert response.context["form"].errors["code"] == ["Enter the authorization code you received."]
    assert Entitlement.objects.count() == 1


def test_console_redeem_is_csrf_protected(alice):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice[0])
    response = client.post(REDEEM, {"code": issue_one()})
    assert response.status_code == 403
    assert not Entitlement.objects.exists()


def test_any_member_may_redeem_for_the_current_organization(db):
    owner, org = make_member("owner@example.com", "shared", "owner")
    member, _ = make_member("member@example.com", "shared", "member")
    client = Client()
    client.force_login(member)
    response = client.post(API, {"code": issue_one()}, content_type="application/json")
    assert response.status_code == 201
    assert Entitlement.objects.for_org(org).count() == 1


def test_redeem_goes_to_the_switched_organization(db):
    user, first = make_member("multi@example.com", "first-org")
    _, second = make_member("multi@example.com", "second-org")
    client = Client()
    client.force_login(user)
    session = client.session
    session["organization_id"] = second.pk
    session.save()
    assert client.post(API, {"code": issue_one()}, content_type="application/json").status_code == 201
    assert Entitlement.objects.get().organization == second


# --- API ------------------------------------------------------------------------------------------


def test_api_redeem_success(alice_client, alice):
    raw = issue_one(token_quota=500, validity_days=3, model_names="a,b")
    response = alice_client.post(API, {"code": raw}, content_type="application/json")
    assert response.status_code == 201
    body = response.json()
    entitlement = Entitlement.objects.get()
    assert body["id"] == entitlement.pk
    assert body["organization"] == alice[1].slug
    assert body["code_prefix"] == raw[:12]
    assert (body["token_quota"], body["tokens_used"], body["tokens_remaining"]) == (500, 0, 500)
    assert body["model_names"] == ["a", "b"] and body["active"] is True
    assert body["ends_at"] is not None
    assert raw not in response.content.decode()


@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_api_redeem_failures(alice_client, alice, outcome):
    make, fragment, status, code = OUTCOMES[outcome]
    raw = make()
    count = Entitlement.objects.count()
    response = alice_client.post(API, {"code": raw}, content_type="application/json")
    assert response.status_code == status
    body = response.json()
    assert fragment in body["error"]["message"] and list(body) == ["error"]  # the one /api error shape
    assert body["error"]["code"] == code
    assert Entitlement.objects.count() == count
    assert not Entitlement.objects.for_org(alice[1]).exists()


def test_api_already_redeemed_is_409(alice_client):
    raw = issue_one(max_redemptions=2)
    assert alice_client.post(API, {"code": raw}, content_type="application/json").status_code == 201
    response = alice_client.post(API, {"code": raw}, content_type="application/json")
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "already_redeemed"
    assert "already redeemed" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "payload, fragment",
    [
        ({}, "Send the authorization code"),
        ({"code": ""}, "empty"),
        ({"code": 12345}, "must be a string"),
        ({"code": None}, "null"),
        ({"code": ["mac-x"]}, "must be a string"),
        ({"code": "m" * 201}, "too long"),
        (["not", "an", "object"], "Send the authorization code"),
    ],
)
def test_api_bad_input_is_400_and_changes_nothing(alice_client, payload, fragment):
    issue_one()
    response = alice_client.post(API, payload, content_type="application/json")
    assert response.status_code == 400
    assert fragment.lower() in response.json()["error"]["message"].lower()
    assert not Entitlement.objects.exists()


def test_api_malformed_json_is_400(alice_client):
    response = alice_client.post(API, "{not json", content_type="application/json")
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_api_requires_login_and_csrf(alice):
    raw = issue_one()
    anonymous = Client(enforce_csrf_checks=True)
    assert anonymous.post(API, {"code": raw}, content_type="application/json").status_code == 403
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice[0])
    response = client.post(API, {"code": raw}, content_type="application/json")
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]["message"]
    assert not Entitlement.objects.exists()
    # With the token from the console page, the same request works.
    client.get(REDEEM)
    token = client.cookies["csrftoken"].value
    response = client.post(API, {"code": raw}, content_type="application/json", headers={"X-CSRFToken": token})
    assert response.status_code == 201


@override_settings(REDEEM_FAILURES_PER_USER=3, REDEEM_FAILURES_PER_IP=100)
def test_api_and_console_rate_limit_failed_attempts_per_user(alice_client, alice):
    good = issue_one()
    for _ in range(2):
        assert alice_client.post(API, {"code": "wrong"}, content_type="application/json").status_code == 404
    assert alice_client.post(REDEEM, {"code": "wrong"}).status_code == 400
    response = alice_client.post(API, {"code": good}, content_type="application/json")
    assert response.status_code == 429
    assert "Too many failed redemption attempts" in response.json()["error"]["message"]
    assert 0 < int(response["Retry-After"]) <= 900
    response = alice_client.post(REDEEM, {"code": good})
    assert "Too many failed redemption attempts" in response.context["form"].errors["code"][0]
    assert not Entitlement.objects.exists()
    assert AuthorizationCode.objects.get().redemption_count == 0


@override_settings(REDEEM_FAILURES_PER_USER=100, REDEEM_FAILURES_PER_IP=3)
def test_api_rate_limit_per_ip_across_users(db):
    good = issue_one()
    clients = []
    for i in range(4):
        user, _ = make_member(f"ip{i}@example.com", f"ip-{i}")
        client = Client(REMOTE_ADDR="198.51.100.9")
        client.force_login(user)
        clients.append(client)
    for client in clients[:3]:
        assert client.post(API, {"code": "wrong"}, content_type="application/json").status_code == 404
    assert clients[3].post(API, {"code": good}, content_type="application/json").status_code == 429
    elsewhere = Client(REMOTE_ADDR="198.51.100.10")
    elsewhere.force_login(Membership.objects.get(organization__slug="ip-3").user)
    assert elsewhere.post(API, {"code": good}, content_type="application/json").status_code == 201


# --- tenant isolation -----------------------------------------------------------------------------


def test_org_a_member_cannot_see_or_use_org_b_entitlements(alice_client, alice, bob):
    theirs = codes.redeem(bob[1], issue_one(token_quota=99), bob[0])
    mine = codes.redeem(alice[1], issue_one(token_quota=11), alice[0])
    listing = alice_client.get("/api/entitlements").json()
    assert [e["id"] for e in listing] == [mine.pk]
    assert alice_client.get(f"/api/entitlements/{mine.pk}").status_code == 200
    response = alice_client.get(f"/api/entitlements/{theirs.pk}")
    assert response.status_code == 404
    assert "99" not in response.content.decode()
    page = alice_client.get(REDEEM).content.decode()
    assert f"entitlement-{mine.pk}" in page and f"entitlement-{theirs.pk}" not in page
    # Bob's code, already redeemed by Bob, is used up for Alice: it never touches Bob's entitlement.
    assert Entitlement.objects.for_org(alice[1]).active().count() == 1
    assert Entitlement.objects.for_org(bob[1]).get() == theirs


def test_entitlement_api_requires_login(client, alice):
    entitlement = codes.redeem(alice[1], issue_one(), alice[0])
    assert client.get("/api/entitlements").status_code == 403
    assert client.get(f"/api/entitlements/{entitlement.pk}").status_code == 403


def test_url_names():
    assert reverse("console:redeem") == REDEEM
    assert reverse("console:api-redeem") == API


def test_api_redeem_without_an_organization(db):
    from accounts.models import User

    lonely = User.objects.create_user("lonely@example.com", "pw-not-used-123")
    client = Client()
    client.force_login(lonely)
    response = client.post(API, {"code": issue_one()}, content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "no_organization"
    assert "not a member of any organization" in response.json()["error"]["message"]
    assert not Entitlement.objects.exists()
    assert client.get(REDEEM)["Location"] == reverse("console:org-new")  # the console sends them to create one
