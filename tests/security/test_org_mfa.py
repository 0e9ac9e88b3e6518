"""Organization-enforced MFA: owners require a second factor of their members (organization/, owners
only); a member without TOTP is then sent to set it up before any console page, an admin or member cannot
change the setting, and other organizations' members are not affected."""

from __future__ import annotations

import pytest
from allauth.mfa.models import Authenticator
from allauth.mfa.totp.internal.auth import TOTP, generate_totp_secret

from accounts.models import Organization, Role

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import add_member, make_user

pytestmark = pytest.mark.django_db

ACTIVATE = "/accounts/2fa/totp/activate/"
SETTINGS = "/organization/"


def with_totp(user):
    TOTP.activate(user, generate_totp_secret())
    return user


def sent_to_set_up(response) -> bool:
    return response.status_code == 302 and response["Location"].startswith(ACTIVATE)


@pytest.fixture
def member(org_a):
    return add_member(org_a, make_user("member@example.com")).user


def test_owner_requires_mfa_and_a_member_without_totp_must_set_it_up(client, owner_a, org_a, member):
    with_totp(owner_a)
    client.force_login(owner_a)
    assert client.post(SETTINGS, {"require_mfa": "on"}).status_code == 302
    org_a.refresh_from_db()
    assert org_a.require_mfa
    assert client.get("/keys/").status_code == 200  # the owner has TOTP

    client.force_login(member)  # a session opened before or after: both are held
    for path in ("/", "/keys/", "/members/", "/api/keys", "/redeem/"):
        assert sent_to_set_up(client.get(path)), path
    assert client.get("/accounts/2fa/").status_code == 200  # the set-up pages stay reachable
    with_totp(member)
    assert client.get("/keys/").status_code == 200


def test_members_are_free_until_it_is_required_and_again_after(client, owner_a, org_a, member):
    client.force_login(member)
    assert client.get("/keys/").status_code == 200
    Organization.objects.filter(pk=org_a.pk).update(require_mfa=True)
    assert sent_to_set_up(client.get("/keys/"))
    with_totp(owner_a)
    client.force_login(owner_a)
    client.post(SETTINGS, {})  # unchecked: no longer required
    assert not Organization.objects.get(pk=org_a.pk).require_mfa
    client.force_login(member)
    assert client.get("/keys/").status_code == 200


def test_an_owner_without_totp_cannot_require_it(client, owner_a, org_a):
    client.force_login(owner_a)
    response = client.post(SETTINGS, {"require_mfa": "on"}, follow=True)
    assert "for yourself first" in response.content.decode()
    assert not Organization.objects.get(pk=org_a.pk).require_mfa


def test_admins_and_members_cannot_change_the_setting(client, org_a, member):
    admin = with_totp(add_member(org_a, make_user("admin@example.com"), Role.ADMIN).user)
    for user in (admin, with_totp(member)):
        client.force_login(user)
        assert client.post(SETTINGS, {"require_mfa": "on"}).status_code == 403
        assert client.get(SETTINGS).status_code == 403
    assert not Organization.objects.get(pk=org_a.pk).require_mfa


def test_members_of_other_organizations_are_not_affected(client, org_a, owner_b, org_b):
    Organization.objects.filter(pk=org_a.pk).update(require_mfa=True)
    client.force_login(owner_b)
    assert client.get("/keys/").status_code == 200
    assert not Authenticator.objects.filter(user=owner_b).exists()


def test_a_member_of_any_requiring_organization_must_set_it_up(client, org_a, owner_b, org_b):
    """The rule is per person: belonging to one organization that requires MFA is enough, whatever
    organization is current (the session could switch to it at any time)."""
    add_member(org_a, owner_b)
    Organization.objects.filter(pk=org_a.pk).update(require_mfa=True)
    client.force_login(owner_b)
    client.post(f"/organizations/{org_b.pk}/switch/")
    assert sent_to_set_up(client.get("/keys/"))


def test_turning_it_on_is_an_audit_event(client, owner_a, org_a):
    from accounts.models import OrganizationEvent

    with_totp(owner_a)
    client.force_login(owner_a)
    client.post(SETTINGS, {"require_mfa": "on"}, REMOTE_ADDR="198.51.100.4")
    event = OrganizationEvent.objects.filter(pgh_obj_id=org_a.pk, pgh_label="update").get()
    assert event.require_mfa and event.pgh_context.metadata["ip"] == "198.51.100.4"
    assert event.pgh_context.metadata["user"] == owner_a.pk


def test_settings_page_offers_the_switch_to_owners(client, owner_a, org_a):
    client.force_login(owner_a)
    body = client.get(SETTINGS).content.decode()
    assert 'name="require_mfa"' in body
