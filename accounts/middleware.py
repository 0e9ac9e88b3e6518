"""Attaches the console user's current organization to the request (`request.organization`), and keeps
a staff member who must set up a second factor on the MFA pages until they have one."""

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
    from allauth.mfa.models import Authenticator

    return Authenticator.objects.filter(user=user, type=Authenticator.Type.TOTP).exists()


@receiver(user_logged_in, dispatch_uid="staff-mfa-required")
def staff_login(sender, request, user, **kwargs) -> None:
    """allauth's login (the only login form, the admin's included) of a staff member without TOTP."""
    if settings.MFA_REQUIRED_FOR_STAFF and user.is_staff and not has_authenticator(user):
        request.session[MFA_SETUP_SESSION_KEY] = True


class MFARequiredMiddleware:
    """Until a staff member flagged at login has set up TOTP, every page but the account pages
    (/accounts/: MFA set-up, log out) redirects to the TOTP set-up."""

    ALLOWED_PREFIXES = ("/accounts/", "/static/", "/health", "/metrics")

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        session = getattr(request, "session", None)
        if session is not None and session.get(MFA_SETUP_SESSION_KEY) and request.user.is_authenticated:
            if has_authenticator(request.user):
                session.pop(MFA_SETUP_SESSION_KEY)
            elif not request.path.startswith(self.ALLOWED_PREFIXES):
                return redirect("mfa_activate_totp")
        return self.get_response(request)
