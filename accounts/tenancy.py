"""Tenancy rules: organizations, memberships, invitations and the per-request organization scope.

Views call these services and never query tenant-owned rows without `get_for_org_or_404` /
`TenantQuerySet.for_org`, so a member of one organization can never reach another's rows.
"""

from __future__ import annotations

import secrets
from datetime import timedelta
from functools import wraps

from allauth.account.adapter import get_adapter
from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect
from django.urls import reverse
from django.utils import timezone

from .middleware import CurrentOrganizationMiddleware
from .models import Invitation, Membership, Organization, Role, User, keyed_hash

INVITATION_VALID_FOR = timedelta(days=7)


class TenancyError(Exception):
    """A tenancy rule refused the action; the message is shown to the user as is."""


# ---- scoping -------------------------------------------------------------------------------------


def get_for_org_or_404(queryset, organization: Organization | None, **lookup):
    """The one object of `organization` matching `lookup`; another organization's object is a 404."""
    if organization is None:
        raise Http404("No organization.")
    if isinstance(queryset, type) and issubclass(queryset, models.Model):
        queryset = queryset._default_manager.all()
    return get_object_or_404(queryset.for_org(organization), **lookup)


def org_member_required(view):
    """Console views: a logged-in user with a current organization (else: go and create one)."""

    @login_required
    @wraps(view)
    def wrapper(request, *args, **kwargs):
        if request.organization is None:
            return redirect("console:org-new")
        return view(request, *args, **kwargs)

    return wrapper


def require_manager(membership: Membership | None) -> None:
    if membership is None or not membership.can_manage:
        raise PermissionDenied("Only owners and admins of this organization can do that.")


# ---- organizations -------------------------------------------------------------------------------


@transaction.atomic
def create_organization(owner: User, name: str, slug: str | None = None) -> Organization:
    """A new organization with `owner` as its first owner."""
    org = Organization.objects.create(name=name, slug=slug or Organization.unique_slug(name))
    Membership.objects.create(organization=org, user=owner, role=Role.OWNER)
    return org


def create_personal_organization(user: User) -> Organization:
    """The organization every user gets on sign-up, named after the email's local part."""
    local = user.email.split("@", 1)[0]
    return create_organization(user, name=f"{local}'s organization", slug=Organization.unique_slug(local))


def switch_organization(request, organization_id: int) -> Organization:
    """Make one of the user's organizations the current one (404 when not a member)."""
    membership = get_object_or_404(
        Membership.objects.select_related("organization"), user=request.user, organization_id=organization_id
    )
    request.session[CurrentOrganizationMiddleware.SESSION_KEY] = membership.organization_id
    request.organization = membership.organization
    request.membership = membership
    return membership.organization


# ---- invitations ---------------------------------------------------------------------------------


def pending_invitations(organization: Organization):
    return Invitation.objects.for_org(organization).filter(
        accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
    )


class InvitationRateLimited(TenancyError):
    """Too many invitations from this inviter or organization in the current window."""


def check_invitation_budget(organization: Organization, inviter: User) -> None:
    """Invitations sent (revoked ones included) within the windows: INVITATIONS_PER_USER_PER_HOUR by
    one inviter across organizations, INVITATIONS_PER_ORGANIZATION_PER_DAY by all of an organization's admins."""
    now = timezone.now()
    per_user = settings.INVITATIONS_PER_USER_PER_HOUR
    if Invitation.objects.filter(invited_by=inviter, created_at__gt=now - timedelta(hours=1)).count() >= per_user:
        raise InvitationRateLimited(f"Too many invitations: at most {per_user} per hour. Try again later.")
    per_org = settings.INVITATIONS_PER_ORGANIZATION_PER_DAY
    if Invitation.objects.for_org(organization).filter(created_at__gt=now - timedelta(days=1)).count() >= per_org:
        raise InvitationRateLimited(f"Too many invitations: at most {per_org} per organization per day. Try again later.")


@transaction.atomic
def invite(organization: Organization, inviter_membership: Membership, email: str, role: str) -> Invitation:
    """Create an invitation and email its link (built on CONSOLE_BASE_URL, never the request's Host);
    the token exists in full only in that email."""
    require_manager(inviter_membership)
    # Serializes this organization's invitations, so concurrent ones cannot overrun the budget.
    Organization.objects.select_for_update().filter(pk=organization.pk).first()
    check_invitation_budget(organization, inviter_membership.user)
    if role == Role.OWNER and inviter_membership.role != Role.OWNER:
        raise TenancyError("Only owners can invite owners.")
    email = email.strip().lower()
    if Membership.objects.for_org(organization).filter(user__email__iexact=email).exists():
        raise TenancyError(f"{email} is already a member of {organization.name}.")
    if pending_invitations(organization).filter(email__iexact=email).exists():
        raise TenancyError(f"{email} already has a pending invitation; revoke it to send a new one.")
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        organization=organization,
        email=email,
        role=role,
        token_hash=keyed_hash(token),
        invited_by=inviter_membership.user,
        expires_at=timezone.now() + INVITATION_VALID_FOR,
    )
    accept_url = settings.CONSOLE_BASE_URL + reverse("console:invitation-accept", args=[token])
    get_adapter().send_mail(
        "accounts/email/invitation",
        email,
        {"invitation": invitation, "organization": organization, "inviter": inviter_membership.user, "accept_url": accept_url},
    )
    return invitation


def invitation_by_token(token: str) -> Invitation:
    """The usable invitation for `token`, or a 404 (unknown, revoked, accepted and expired look alike)."""
    invitation = (
        Invitation.objects.select_related("organization")
        .filter(token_hash=keyed_hash(token), accepted_at__isnull=True, revoked_at__isnull=True)
        .first()
    )
    if invitation is None or invitation.expires_at <= timezone.now():
        raise Http404("This invitation is unknown, expired, revoked or already accepted.")
    return invitation


@transaction.atomic
def accept_invitation(user: User, token: str) -> Membership:
    invitation = invitation_by_token(token)
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    if invitation.accepted_at is not None:
        raise Http404("This invitation was already accepted.")
    if user.email.lower() != invitation.email.lower():
        raise TenancyError(
            f"This invitation is for {invitation.email}; you are logged in as {user.email}. "
            "Log in with the invited address to accept it."
        )
    membership, _ = Membership.objects.get_or_create(
        organization=invitation.organization, user=user, defaults={"role": invitation.role}
    )
    invitation.accepted_at = timezone.now()
    invitation.save(update_fields=["accepted_at"])
    return membership


def revoke_invitation(actor: Membership, invitation: Invitation) -> None:
    require_manager(actor)
    if invitation.organization_id != actor.organization_id:
        raise Http404
    if invitation.accepted_at is not None:
        raise TenancyError("This invitation was already accepted.")
    if invitation.revoked_at is None:
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])


# ---- members -------------------------------------------------------------------------------------


def _locked_members(actor: Membership, target: Membership) -> tuple[Membership, Membership, int]:
    """Re-read actor and target with the organization's memberships locked (always in pk order, so
    concurrent changes queue instead of deadlocking): roles are checked as they are now, not as loaded."""
    if target.organization_id != actor.organization_id:
        raise Http404
    members = {
        m.pk: m
        for m in Membership.objects.select_for_update().filter(organization_id=actor.organization_id).order_by("pk")
    }
    fresh_actor, fresh_target = members.get(actor.pk), members.get(target.pk)
    if fresh_target is None:
        raise Http404
    require_manager(fresh_actor)
    owners = sum(1 for m in members.values() if m.role == Role.OWNER)
    return fresh_actor, fresh_target, owners


def _check_can_touch(actor: Membership, target: Membership, new_role: str | None) -> None:
    if actor.role != Role.OWNER and (target.role == Role.OWNER or new_role == Role.OWNER):
        raise TenancyError("Only owners can change or remove owners.")


@transaction.atomic
def change_role(actor: Membership, target: Membership, role: str) -> Membership:
    if role not in Role.values:
        raise TenancyError(f"Unknown role {role!r}.")
    actor, fresh, owners = _locked_members(actor, target)
    _check_can_touch(actor, fresh, role)
    if fresh.role == Role.OWNER and role != Role.OWNER and owners <= 1:
        raise TenancyError("An organization needs at least one owner: make someone else owner first.")
    fresh.role = role
    fresh.save(update_fields=["role"])
    target.role = role
    return target


@transaction.atomic
def remove_member(actor: Membership, target: Membership) -> None:
    actor, fresh, owners = _locked_members(actor, target)
    _check_can_touch(actor, fresh, None)
    if fresh.role == Role.OWNER and owners <= 1:
        raise TenancyError("The last owner cannot be removed.")
    fresh.delete()


# ---- organization settings -----------------------------------------------------------------------


def require_owner(membership: Membership | None) -> None:
    if membership is None or membership.role != Role.OWNER:
        raise PermissionDenied("Only owners of this organization can do that.")


@transaction.atomic
def set_require_mfa(actor: Membership, required: bool) -> Organization:
    """Owners require (or stop requiring) a second factor of every member. An owner without one
    must set it up first, so turning it on never locks the owner out mid-session."""
    from .middleware import has_authenticator

    require_owner(actor)
    if required and not has_authenticator(actor.user):
        raise TenancyError("Set up two-factor authentication for yourself first (Security, in the top bar).")
    org = Organization.objects.select_for_update().get(pk=actor.organization_id)
    if org.require_mfa != required:
        org.require_mfa = required
        org.save(update_fields=["require_mfa"])
    return org
