"""Attaches the console user's current organization to the request (`request.organization`), and keeps
a user who must set up a second factor (staff, members of an organization that requires it) on the MFA
pages until they have one."""

from __future__ import annotations

from allauth.account.signals import user_logged_in
from django.conf import settings
from django.dispatch import receiver
from django.shortcuts import redirect

from .models import Membership


class CurrentOrganizationMiddleware:
    SESSION_KEY = "organization_id"

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request.organization = None
        request.membership = None
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            memberships = Membership.objects.filter(user=user).select_related("organization")
            wanted = request.session.get(self.SESSION_KEY)
            membership = None
            if wanted is not None:
                membership = memberships.filter(organization_id=wanted).first()
            if membership is None:
                membership = memberships.order_by("created_at").first()
            if membership is not None:
                request.membership = membership
                request.organization = membership.organization
        return self.get_response(request)


MFA_SETUP_SESSION_KEY = "mfa_setup_required"


def has_authenticator(user) -> bool:
    """A second factor of its own: a TOTP app or a security key (recovery codes only back them up)."""
    from allauth.mfa.models import Authenticator

    return Authenticator.objects.filter(
        user=user, type__in=[Authenticator.Type.TOTP, Authenticator.Type.WEBAUTHN]
    ).exists()


@receiver(user_logged_in, dispatch_uid="staff-mfa-required")
def staff_login(sender, request, user, **kwargs) -> None:
    """allauth's login (the only login form, the admin's included) of a staff member without a second factor."""
    if settings.MFA_REQUIRED_FOR_STAFF and user.is_staff and not has_authenticator(user):
        request.session[MFA_SETUP_SESSION_KEY] = True


def organization_requires_mfa(user) -> bool:
    """True when an active organization the user belongs to requires a second factor of its members."""
    return Membership.objects.filter(user=user, organization__require_mfa=True, organization__is_active=True).exists()


class MFARequiredMiddleware:
    """Until a user who must have a second factor has one (TOTP or a security key), every page but the account pages
    (/accounts/: MFA set-up, log out) redirects to the TOTP set-up. Who must: a staff member flagged at
    login (MFA_REQUIRED_FOR_STAFF), and every member of an organization whose owners require it
    (`Organization.require_mfa`, checked on each request, so it applies to sessions already open)."""

    ALLOWED_PREFIXES = ("/accounts/", "/static/", "/health", "/metrics", "/v1/")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith(self.ALLOWED_PREFIXES):
            return self.get_response(request)
        session = getattr(request, "session", None)
        user = getattr(request, "user", None)
        if session is not None and user is not None and user.is_authenticated:
            staff_flagged = bool(session.get(MFA_SETUP_SESSION_KEY))
            if (staff_flagged or organization_requires_mfa(user)) and not has_authenticator(user):
                return redirect("mfa_activate_totp")
            if staff_flagged:
                session.pop(MFA_SETUP_SESSION_KEY)
        return self.get_response(request)
