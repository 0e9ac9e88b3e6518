"""Attaches the console user's current organization to the request (`request.organization`)."""

from __future__ import annotations

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
