"""Dashboard and organization pages of the console."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from .. import tenancy
from ..forms import OrganizationForm
from ..models import Entitlement


@tenancy.org_member_required
def dashboard(request):
    entitlements = list(Entitlement.objects.for_org(request.organization).active().select_related("code"))
    for entitlement in entitlements:
        entitlement.used_percent = (
            min(100, round(100 * entitlement.tokens_used / entitlement.token_quota)) if entitlement.token_quota else None
        )
    return render(request, "console/dashboard.html", {"entitlements": entitlements})


@login_required
def organization_new(request):
    form = OrganizationForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        org = tenancy.create_organization(request.user, form.cleaned_data["name"])
        tenancy.switch_organization(request, org.pk)
        messages.success(request, f"Created {org.name}; it is now your current organization.")
        return redirect("console:dashboard")
    return render(request, "console/organization_new.html", {"form": form})


@login_required
@require_POST
def organization_switch(request, pk: int):
    org = tenancy.switch_organization(request, pk)
    messages.success(request, f"Switched to {org.name}.")
    return redirect("console:dashboard")
