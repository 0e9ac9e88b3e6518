from allauth.account.adapter import DefaultAccountAdapter
from django.db import transaction


class AccountAdapter(DefaultAccountAdapter):
    """Sign-up creates the user's own organization. `send_mail` (inherited) is the single path for
    every email the platform sends: allauth's and our invitations."""

    def save_user(self, request, user, form, commit=True):
        from .tenancy import create_personal_organization

        with transaction.atomic():
            user = super().save_user(request, user, form, commit=commit)
            if commit:
                create_personal_organization(user)
        return user
