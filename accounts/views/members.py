"""Members, roles and invitations of the current organization."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from .. import tenancy
from ..forms import InvitationForm, RoleForm
from ..models import Invitation, Membership, Role


def _members_page(request, invite_form=None, status=200):
    org = request.organization
    context = {
        "members": Membership.objects.for_org(org).select_related("user").order_by("created_at"),
        "invitations": tenancy.pending_invitations(org).select_related("invited_by"),
        "invite_form": invite_form or InvitationForm(),
        "roles": Role.choices,
        "can_manage": request.membership.can_manage,
    }
    return render(request, "console/members.html", context, status=status)


@tenancy.org_member_required
def members(request):
    return _members_page(request)


@tenancy.org_member_required
@require_POST
def member_invite(request):
    tenancy.require_manager(request.membership)
    form = InvitationForm(request.POST)
    if form.is_valid():
        try:
            invitation = tenancy.invite(
                request.organization, request.membership, form.cleaned_data["email"], form.cleaned_data["role"]
            )
        except tenancy.InvitationRateLimited as exc:
            form.add_error(None, str(exc))
            return _members_page(request, invite_form=form, status=429)
        except tenancy.TenancyError as exc:
            form.add_error("email", str(exc))
        else:
            messages.success(request, f"Invitation sent to {invitation.email}.")
            return redirect("console:members")
    return _members_page(request, invite_form=form, status=400)


@tenancy.org_member_required
@require_POST
def member_role(request, pk: int):
    target = tenancy.get_for_org_or_404(Membership.objects.select_related("user"), request.organization, pk=pk)
    form = RoleForm(request.POST)
    if not form.is_valid():
        messages.error(request, "Choose one of the roles: owner, admin or member.")
        return redirect("console:members")
    try:
        tenancy.change_role(request.membership, target, form.cleaned_data["role"])
    except tenancy.TenancyError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"{target.user.email} is now {target.get_role_display().lower()}.")
    return redirect("console:members")


@tenancy.org_member_required
@require_POST
def member_remove(request, pk: int):
    target = tenancy.get_for_org_or_404(Membership.objects.select_related("user"), request.organization, pk=pk)
    try:
        tenancy.remove_member(request.membership, target)
    except tenancy.TenancyError as exc:
        messages.error(request, str(exc))
        return redirect("console:members")
    messages.success(request, f"Removed {target.user.email} from {request.organization.name}.")
    if target.user_id == request.user.id:
        request.session.pop("organization_id", None)
        return redirect("console:dashboard")
    return redirect("console:members")


@tenancy.org_member_required
@require_POST
def invitation_revoke(request, pk: int):
    invitation = tenancy.get_for_org_or_404(Invitation, request.organization, pk=pk)
    try:
        tenancy.revoke_invitation(request.membership, invitation)
    except tenancy.TenancyError as exc:
        messages.error(request, str(exc))
    else:
        messages.success(request, f"Revoked the invitation of {invitation.email}.")
    return redirect("console:members")


@login_required
def invitation_accept(request, token: str):
    invitation = tenancy.invitation_by_token(token)
    error = None
    if request.method == "POST":
        try:
            membership = tenancy.accept_invitation(request.user, token)
        except tenancy.TenancyError as exc:
            error = str(exc)
        else:
            tenancy.switch_organization(request, membership.organization_id)
            messages.success(request, f"You joined {membership.organization.name}.")
            return redirect("console:dashboard")
    elif request.user.email.lower() != invitation.email.lower():
        error = (
            f"This invitation is for {invitation.email}; you are logged in as {request.user.email}. "
            "Log in with the invited address to accept it."
        )
    return render(
        request, "console/invitation_accept.html", {"invitation": invitation, "error": error}, status=403 if error else 200
    )
