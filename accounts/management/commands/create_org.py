"""`manage.py create_org SLUG --owner EMAIL [--name NAME]`: an organization and its owner, from a shell."""

from __future__ import annotations

from allauth.account.forms import default_token_generator
from allauth.account.models import EmailAddress
from allauth.account.utils import user_pk_to_url_str
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_email, validate_slug
from django.db import transaction
from django.urls import reverse

from accounts import tenancy
from accounts.models import Membership, Organization, Role, User


def password_set_link(user: User) -> str:
    """allauth's password-reset-from-key page for `user`; the token dies once the password is set."""
    path = reverse(
        "account_reset_password_from_key",
        kwargs={"uidb36": user_pk_to_url_str(user), "key": default_token_generator.make_token(user)},
    )
    return f"{settings.CONSOLE_BASE_URL}{path}"


class Command(BaseCommand):
    help = "Create an organization owned by EMAIL (creating that user if needed, with a password-set link)."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--owner", required=True, metavar="EMAIL")
        parser.add_argument("--name", help="Display name (default: the slug).")
        parser.add_argument(
            "--email-verified",
            action="store_true",
            help="Mark the owner's address verified (only if you know it is theirs); otherwise they confirm it at first login.",
        )

    def handle(self, *args, slug: str, owner: str, name: str | None, email_verified: bool, **options):
        email = owner.strip().lower()
        try:
            validate_email(email)
            validate_slug(slug)
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        if len(slug) > 64:
            raise CommandError("The slug must be at most 64 characters.")
        if Organization.objects.filter(slug=slug).exists():
            raise CommandError(f"An organization with slug {slug!r} already exists.")
        with transaction.atomic():
            user = User.objects.filter(email__iexact=email).first()
            created_user = user is None
            if created_user:
                user = User.objects.create_user(email)
            address, _ = EmailAddress.objects.get_or_create(
                user=user, email=user.email, defaults={"primary": True, "verified": email_verified}
            )
            if email_verified and not address.verified:
                address.verified = True
                address.save(update_fields=["verified"])
            org = tenancy.create_organization(user, name=name or slug, slug=slug)
        assert Membership.objects.filter(organization=org, user=user, role=Role.OWNER).exists()
        self.stdout.write(f"Created organization {org.slug} (id {org.pk}) owned by {user.email}.")
        if created_user:
            self.stdout.write(f"Created user {user.email}. Set a password here (single use):")
            self.stdout.write(password_set_link(user))
