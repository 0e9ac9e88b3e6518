import logging

from allauth.account.adapter import DefaultAccountAdapter
from allauth.socialaccount.adapter import DefaultSocialAccountAdapter
from django.db import transaction

logger = logging.getLogger(__name__)


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


class SocialAccountAdapter(DefaultSocialAccountAdapter):
    """A user created by SSO joins the organization its verified email domain maps to
    (SSO_DOMAIN_ORGANIZATIONS); anyone else gets an organization of their own, like a local sign-up."""

    def save_user(self, request, sociallogin, form=None):
        from .sso import join_mapped_organization, verified_emails
        from .tenancy import create_personal_organization

        with transaction.atomic():
            user = super().save_user(request, sociallogin, form)
            joined = join_mapped_organization(user, verified_emails(sociallogin))
            if joined is None and form is None:  # with a sign-up form, AccountAdapter.save_user made one
                create_personal_organization(user)
        return user

    def list_apps(self, request, provider=None, client_id=None):
        """Only the provider the environment configures (SSO_OIDC_*): a SocialApp row, made in the shell
        or a database, never becomes a way to sign in (it could assert anyone's verified email)."""
        return [app for app in super().list_apps(request, provider, client_id) if app.pk is None]

    def on_authentication_error(self, request, provider, error=None, exception=None, extra_context=None):
        """Operators see why a sign-in failed (the page tells the user only that it did)."""
        logger.warning("SSO sign-in through %s failed: %s %r", getattr(provider, "sub_id", provider), error, exception)
        super().on_authentication_error(request, provider, error, exception, extra_context)
