"""The current organization's settings (owners) and its audit log (owners)."""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect, render

from .. import audit, tenancy
from ..middleware import has_authenticator


@tenancy.org_member_required
def organization_settings(request):
    tenancy.require_owner(request.membership)
    if request.method == "POST":
        required = request.POST.get("require_mfa") == "on"
        try:
            tenancy.set_require_mfa(request.membership, required)
        except tenancy.TenancyError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(
                request, "Members must now use two-factor authentication." if required else "Two-factor authentication is optional again."
            )
        return redirect("console:org-settings")
    context = {"has_authenticator": has_authenticator(request.user)}
    return render(request, "console/organization_settings.html", context)


@tenancy.org_member_required
def organization_audit(request):
    tenancy.require_owner(request.membership)
    return render(request, "console/organization_audit.html", {"entries": audit.organization_events(request.organization)})
