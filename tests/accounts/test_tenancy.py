"""Tenancy rules: sign-up creates an organization, invitations, roles, switching, scoping helper."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlparse

import pytest
from django.core import mail
from django.http import Http404
from django.urls import reverse
from django.utils import timezone

from accounts import tenancy
from accounts.models import APIKey, Invitation, Membership, Organization, Role, User, keyed_hash

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import PASSWORD, add_member, link_in_last_mail, make_org, make_user

pytestmark = pytest.mark.django_db


def signup(client, email: str):
    return client.post(reverse("account_signup"), {"email": email, "password1": PASSWORD, "password2": PASSWORD})


def test_signup_creates_own_organization_with_user_as_owner(client):
    response = signup(client, "new.person@example.com")
    assert response.status_code == 302
    user = User.objects.get(email="new.person@example.com")
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.OWNER
    assert membership.organization.slug == "newperson" or membership.organization.slug.startswith("new")
    assert "new.person" in membership.organization.name


def test_signup_then_email_verification_logs_in_to_dashboard_of_own_org(client):
    signup(client, "verify.me@example.com")
    assert len(mail.outbox) == 1
    link = link_in_last_mail("/accounts/confirm-email/")
    path = urlparse(link).path
    assert client.get(path).status_code == 200  # confirmation page, not confirmed on GET
    response = client.post(path)
    assert response.status_code == 302
    page = client.get(reverse("console:dashboard"))
    assert page.status_code == 200
    assert "verify.me&#x27;s organization" in page.content.decode()


def test_failed_signup_creates_nothing(client):
    response = client.post(reverse("account_signup"), {"email": "not-an-email", "password1": "x", "password2": "y"})
    assert response.status_code == 200
    assert not User.objects.exists() and not Organization.objects.exists()


def test_two_signups_with_same_local_part_get_distinct_slugs(client):
    signup(client, "sam@one.example")
    client.logout()
    signup(client, "sam@two.example")
    slugs = sorted(Organization.objects.values_list("slug", flat=True))
    assert slugs == ["sam", "sam-2"]


# ---- invitations --------------------------------------------------------------------------------


def test_invitation_flow_email_accept_and_switch(client_a, org_a, client):
    response = client_a.post(reverse("console:member-invite"), {"email": "Invitee@Example.com", "role": "admin"})
    assert response.status_code == 302
    invitation = Invitation.objects.get(organization=org_a)
    assert invitation.email == "invitee@example.com" and invitation.role == Role.ADMIN
    assert len(mail.outbox) == 1 and mail.outbox[0].to == ["invitee@example.com"]
    link = link_in_last_mail("/invitations/accept/")
    token = link.rstrip("/").rsplit("/", 1)[1]
    assert invitation.token_hash == keyed_hash(token)
    assert token not in invitation.token_hash

    # The invitee signs up elsewhere (gets their own org) and then accepts.
    client_a.logout()
    invitee = make_user("invitee@example.com")
    make_org(invitee, "invitee-own")
    client.force_login(invitee)
    accept_path = urlparse(link).path
    assert client.get(accept_path).status_code == 200
    response = client.post(accept_path)
    assert response.status_code == 302
    assert Membership.objects.get(organization=org_a, user=invitee).role == Role.ADMIN
    assert client.session["organization_id"] == org_a.pk
    invitation.refresh_from_db()
    assert invitation.accepted_at is not None
    # Single use.
    assert client.post(accept_path).status_code == 404


def test_invitation_must_be_accepted_with_the_invited_email(client_a, org_a, client):
    client_a.post(reverse("console:member-invite"), {"email": "right@example.com", "role": "member"})
    path = urlparse(link_in_last_mail("/invitations/accept/")).path
    client.force_login(make_user("wrong@example.com"))
    response = client.post(path)
    assert response.status_code == 403
    assert "right@example.com" in response.content.decode()
    assert not Membership.objects.filter(organization=org_a, user__email="wrong@example.com").exists()
    assert Invitation.objects.get().accepted_at is None


def test_invitation_accept_requires_login(client_a, client):
    client_a.post(reverse("console:member-invite"), {"email": "x@example.com", "role": "member"})
    path = urlparse(link_in_last_mail("/invitations/accept/")).path
    client_a.logout()
    response = client.get(path)
    assert response.status_code == 302 and reverse("account_login") in response["Location"]


def test_expired_revoked_or_unknown_invitation_is_404(client_a, org_a, owner_a, client):
    client_a.post(reverse("console:member-invite"), {"email": "late@example.com", "role": "member"})
    path = urlparse(link_in_last_mail("/invitations/accept/")).path
    invitation = Invitation.objects.get()
    invitee = make_user("late@example.com")
    client.force_login(invitee)
    Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert client.post(path).status_code == 404
    Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now() + timedelta(days=1))
    client_a.force_login(owner_a)
    assert client_a.post(reverse("console:invitation-revoke", args=[invitation.pk])).status_code == 302
    assert client.post(path).status_code == 404
    assert client.post("/invitations/accept/not-a-real-token/").status_code == 404
    assert not Membership.objects.filter(user=invitee).exists()


@pytest.mark.parametrize(
    "data,error",
    [
        ({"email": "", "role": "member"}, "This field is required"),
        ({"email": "nope", "role": "member"}, "valid email"),
        ({"email": "a@example.com", "role": "emperor"}, "Select a valid choice"),
        ({"email": "owner-a@example.com", "role": "member"}, "already a member"),
    ],
)
def test_invite_bad_input_shows_form_error_and_sends_nothing(client_a, org_a, data, error):
    response = client_a.post(reverse("console:member-invite"), data)
    assert response.status_code == 400
    assert error in response.content.decode()
    assert not Invitation.objects.exists() and not mail.outbox


def test_second_invitation_to_same_address_is_refused(client_a):
    client_a.post(reverse("console:member-invite"), {"email": "dup@example.com", "role": "member"})
    response = client_a.post(reverse("console:member-invite"), {"email": "DUP@example.com", "role": "member"})
    assert response.status_code == 400 and "pending invitation" in response.content.decode()
    assert Invitation.objects.count() == 1 and len(mail.outbox) == 1


# ---- roles --------------------------------------------------------------------------------------


def test_plain_member_cannot_invite_change_roles_or_remove(client, org_a, owner_a):
    member = make_user("member@example.com")
    membership = add_member(org_a, member, Role.MEMBER)
    owner_membership = Membership.objects.get(user=owner_a)
    client.force_login(member)
    assert client.post(reverse("console:member-invite"), {"email": "z@example.com", "role": "member"}).status_code == 403
    assert client.post(reverse("console:member-role", args=[membership.pk]), {"role": "owner"}).status_code == 403
    assert client.post(reverse("console:member-remove", args=[owner_membership.pk])).status_code == 403
    membership.refresh_from_db()
    assert membership.role == Role.MEMBER and Membership.objects.filter(organization=org_a).count() == 2
    assert not Invitation.objects.exists()
    page = client.get(reverse("console:members")).content.decode()
    assert "Only owners and admins" in page and "Send invitation" not in page


def test_admin_manages_members_but_not_owners(client, org_a, owner_a):
    admin_user = make_user("admin@example.com")
    add_member(org_a, admin_user, Role.ADMIN)
    other = add_member(org_a, make_user("other@example.com"), Role.MEMBER)
    owner_membership = Membership.objects.get(user=owner_a)
    client.force_login(admin_user)
    client.post(reverse("console:member-role", args=[other.pk]), {"role": "admin"})
    other.refresh_from_db()
    assert other.role == Role.ADMIN
    # Admins cannot make owners, demote or remove owners, or invite owners.
    client.post(reverse("console:member-role", args=[other.pk]), {"role": "owner"})
    client.post(reverse("console:member-role", args=[owner_membership.pk]), {"role": "member"})
    client.post(reverse("console:member-remove", args=[owner_membership.pk]))
    response = client.post(reverse("console:member-invite"), {"email": "boss@example.com", "role": "owner"})
    assert response.status_code == 400 and "Only owners can invite owners" in response.content.decode()
    other.refresh_from_db()
    owner_membership.refresh_from_db()
    assert other.role == Role.ADMIN and owner_membership.role == Role.OWNER
    client.post(reverse("console:member-remove", args=[other.pk]))
    assert not Membership.objects.filter(pk=other.pk).exists()


def test_last_owner_cannot_be_demoted_or_removed(client_a, org_a, owner_a):
    me = Membership.objects.get(user=owner_a)
    response = client_a.post(reverse("console:member-role", args=[me.pk]), {"role": "admin"}, follow=True)
    assert "at least one owner" in response.content.decode()
    response = client_a.post(reverse("console:member-remove", args=[me.pk]), follow=True)
    assert "last owner cannot be removed" in response.content.decode()
    me.refresh_from_db()
    assert me.role == Role.OWNER


def test_owner_can_step_down_once_another_owner_exists(client_a, org_a, owner_a):
    second = add_member(org_a, make_user("second@example.com"), Role.MEMBER)
    me = Membership.objects.get(user=owner_a)
    client_a.post(reverse("console:member-role", args=[second.pk]), {"role": "owner"})
    client_a.post(reverse("console:member-role", args=[me.pk]), {"role": "member"})
    second.refresh_from_db()
    me.refresh_from_db()
    assert (second.role, me.role) == (Role.OWNER, Role.MEMBER)
    with pytest.raises(tenancy.TenancyError):
        tenancy.change_role(second, second, Role.ADMIN)


def test_bad_role_value_changes_nothing(client_a, org_a):
    other = add_member(org_a, make_user("o@example.com"), Role.MEMBER)
    response = client_a.post(reverse("console:member-role", args=[other.pk]), {"role": "god"}, follow=True)
    assert "Choose one of the roles" in response.content.decode()
    other.refresh_from_db()
    assert other.role == Role.MEMBER


def test_removed_member_loses_access_to_the_org(client, org_a, owner_a):
    member = make_user("leaving@example.com")
    membership = add_member(org_a, member, Role.MEMBER)
    key, _ = APIKey.objects.create_key(org_a, "shared")
    tenancy.remove_member(Membership.objects.get(user=owner_a), membership)
    client.force_login(member)
    # No organization left: the console asks them to create one; org A's keys are unreachable.
    assert client.get(reverse("console:keys")).status_code == 302
    assert client.get(reverse("console:api-key", args=[key.pk])).status_code == 404


# ---- switching ----------------------------------------------------------------------------------


def test_switch_between_own_organizations(client_a, org_a, owner_a):
    second = make_org(owner_a, "second-org")
    APIKey.objects.create_key(second, "key-in-second")
    APIKey.objects.create_key(org_a, "key-in-first")
    page = client_a.get(reverse("console:keys")).content.decode()
    assert "key-in-first" in page and "key-in-second" not in page
    response = client_a.post(reverse("console:org-switch", args=[second.pk]))
    assert response.status_code == 302 and client_a.session["organization_id"] == second.pk
    page = client_a.get(reverse("console:keys")).content.decode()
    assert "key-in-second" in page and "key-in-first" not in page


def test_switch_to_foreign_org_is_404_and_keeps_session(client_a, org_a, org_b):
    client_a.post(reverse("console:org-switch", args=[org_a.pk]))
    assert client_a.post(reverse("console:org-switch", args=[org_b.pk])).status_code == 404
    assert client_a.session["organization_id"] == org_a.pk
    assert client_a.get(reverse("console:org-switch", args=[org_a.pk])).status_code == 405


def test_create_extra_organization_makes_it_current(client_a, owner_a):
    response = client_a.post(reverse("console:org-new"), {"name": "Research Lab"})
    assert response.status_code == 302
    org = Organization.objects.get(name="Research Lab")
    assert org.slug == "research-lab"
    assert Membership.objects.get(organization=org, user=owner_a).role == Role.OWNER
    assert client_a.session["organization_id"] == org.pk
    response = client_a.post(reverse("console:org-new"), {"name": "   "})
    assert response.status_code == 200 and "This field is required" in response.content.decode()
    assert Organization.objects.count() == 2


def test_user_without_organization_is_sent_to_create_one(client):
    client.force_login(make_user("lonely@example.com"))
    response = client.get(reverse("console:dashboard"))
    assert response.status_code == 302 and response["Location"] == reverse("console:org-new")


def test_get_for_org_or_404_scopes_by_organization(org_a, org_b):
    key_b, _ = APIKey.objects.create_key(org_b, "b")
    assert tenancy.get_for_org_or_404(APIKey, org_b, pk=key_b.pk) == key_b
    with pytest.raises(Http404):
        tenancy.get_for_org_or_404(APIKey, org_a, pk=key_b.pk)
    with pytest.raises(Http404):
        tenancy.get_for_org_or_404(APIKey.objects.all(), None, pk=key_b.pk)


def test_invitations_and_allauth_mail_share_the_adapter_send_path(client_a, monkeypatch, client):
    from accounts.adapters import AccountAdapter

    sent: list[str] = []
    original = AccountAdapter.send_mail

    def recording(self, template_prefix, email, context):
        sent.append(template_prefix)
        return original(self, template_prefix, email, context)

    monkeypatch.setattr(AccountAdapter, "send_mail", recording)
    client_a.post(reverse("console:member-invite"), {"email": "path@example.com", "role": "member"})
    client_a.logout()
    signup(client, "path2@example.com")
    assert sent == ["accounts/email/invitation", "account/email/email_confirmation_signup"]
    assert len(mail.outbox) == 2
