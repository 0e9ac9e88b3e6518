"""Single sign-on (OpenID Connect, allauth's socialaccount): people whose provider-verified email is in a
domain of SSO_DOMAIN_ORGANIZATIONS join that organization with its role, once, when their SSO account is
created (a new user) or connected (an existing local user signing in through SSO the first time)."""

from __future__ import annotations

import logging

from allauth.socialaccount.models import SocialLogin
from allauth.socialaccount.signals import social_account_added
from django.conf import settings
from django.db import transaction
from django.dispatch import receiver

from .models import Membership, Organization, User

logger = logging.getLogger(__name__)


def verified_emails(sociallogin: SocialLogin) -> list[str]:
    """Addresses the provider vouches for (`email_verified`); an unverified claim maps to nothing."""
    return [address.email.lower() for address in sociallogin.email_addresses if address.verified]


def mapped_organization(email: str) -> tuple[Organization, str] | None:
    """(organization, role) for the email's domain, or None (unmapped, or its organization is gone)."""
    rule = settings.SSO_DOMAIN_ORGANIZATIONS.get(email.rpartition("@")[2])
    if rule is None:
        return None
    organization = Organization.objects.filter(slug=rule["organization"], is_active=True).first()
    if organization is None:
        logger.warning("SSO_DOMAIN_ORGANIZATIONS names no active organization %r", rule["organization"])
        return None
    return organization, rule["role"]


@transaction.atomic
def join_mapped_organization(user: User, emails: list[str]) -> Membership | None:
    """The membership the first mapped email gives; an existing membership keeps its role."""
    for email in emails:
        target = mapped_organization(email)
        if target is not None:
            organization, role = target
            membership, _ = Membership.objects.get_or_create(
                organization=organization, user=user, defaults={"role": role}
            )
            return membership
    return None


@receiver(social_account_added, dispatch_uid="sso-connect-joins-mapped-organization")
def account_connected(sender, request, sociallogin: SocialLogin, **kwargs) -> None:
    """An existing user's first SSO sign-in (matched on the verified email) or an explicit connection."""
    join_mapped_organization(sociallogin.user, verified_emails(sociallogin))
