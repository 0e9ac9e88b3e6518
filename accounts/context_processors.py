from .models import Membership


def organization(request):
    user = getattr(request, "user", None)
    memberships = []
    if user is not None and user.is_authenticated:
        memberships = Membership.objects.filter(user=user).select_related("organization")
    return {
        "current_organization": getattr(request, "organization", None),
        "current_membership": getattr(request, "membership", None),
        "memberships": memberships,
    }
