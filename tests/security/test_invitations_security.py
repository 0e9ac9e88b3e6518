"""Invitations are no spam relay: rate-limited per organization and per inviter, the tenant-chosen
organization name is inert in the subject and body, and the link's origin is CONSOLE_BASE_URL."""

from __future__ import annotations

import pytest
from django.core import mail
from django.urls import reverse

from accounts.models import Invitation, Organization

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import add_member, make_org, make_user

pytestmark = pytest.mark.django_db

INVITE = "/members/invite/"


def invite(client, email: str, **extra):
    return client.post(INVITE, {"email": email, "role": "member"}, **extra)


def test_invitation_link_comes_from_console_base_url_not_the_host_header(client_a, settings):
    settings.CONSOLE_BASE_URL = "https://console.maas.example"
    response = invite(client_a, "friend@example.com", HTTP_HOST="localhost")
    assert response.status_code == 302
    body = mail.outbox[-1].body
    assert "https://console.maas.example/invitations/accept/" in body
    assert "localhost" not in body and "testserver" not in body


def test_invitations_per_inviter_are_limited(client_a, org_a, settings):
    settings.INVITATIONS_PER_USER_PER_HOUR = 3
    for n in range(3):
        assert invite(client_a, f"friend{n}@example.com").status_code == 302
    refused = invite(client_a, "one-too-many@example.com")
    assert refused.status_code == 429
    assert "Too many invitations" in refused.content.decode()
    assert len(mail.outbox) == 3
    assert not Invitation.objects.filter(email="one-too-many@example.com").exists()


def test_revoking_does_not_reset_the_limit(client_a, org_a, settings):
    settings.INVITATIONS_PER_USER_PER_HOUR = 1
    assert invite(client_a, "a@example.com").status_code == 302
    client_a.post(reverse("console:invitation-revoke", args=[Invitation.objects.get().pk]))
    assert invite(client_a, "b@example.com").status_code == 429


def test_invitations_per_organization_are_limited_across_its_admins(client, org_a, settings):
    settings.INVITATIONS_PER_ORGANIZATION_PER_DAY = 2
    settings.INVITATIONS_PER_USER_PER_HOUR = 100
    admins = [make_user(f"admin{n}@example.com") for n in range(2)]
    for n, admin in enumerate(admins):
        add_member(org_a, admin, "admin")
        client.force_login(admin)
        assert invite(client, f"x{n}@example.com").status_code == 302
    assert invite(client, "x9@example.com").status_code == 429
    # Another organization has its own budget.
    other = make_org(admins[0], "org-other")
    client.force_login(admins[0])
    client.post(reverse("console:org-switch", args=[other.pk]))
    assert invite(client, "x9@example.com").status_code == 302


def test_organization_name_is_inert_in_subject_and_body(client_a, org_a):
    Organization.objects.filter(pk=org_a.pk).update(
        name="Prize\u202e <b>WIN</b> at http://evil.example/claim or www.evil.example\r\nBcc: victim@example.com"
    )
    assert invite(client_a, "friend@example.com").status_code == 302
    message = mail.outbox[-1]
    for text in (message.subject, message.body):
        assert "http://evil.example" not in text and "www.evil.example" not in text and "victim@example.com" not in text
        assert "\u202e" not in text
        assert "evil[.]example" in text
    assert "\n" not in message.subject and "\r" not in message.subject
    assert "Bcc:" not in message.extra_headers and "Bcc" not in message.message().as_string().split("\n\n", 1)[0]
