"""`manage.py redeem_code --org SLUG CODE`: redeem a code for an organization, with the console's checks."""

from django.core.management.base import BaseCommand, CommandError

from accounts import codes
from accounts.models import Organization


class Command(BaseCommand):
    help = "Redeem an authorization code for an organization (same checks as the console)."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="Slug of the organization.")
        parser.add_argument("code", help="The authorization code.")

    def handle(self, *args, **options):
        organization = Organization.objects.filter(slug=options["org"]).first()
        if organization is None:
            raise CommandError(f"No organization with the slug “{options['org']}”.")
        try:
            entitlement = codes.redeem(organization, options["code"])
        except codes.RedemptionError as exc:
            raise CommandError(exc.message) from exc
        quota = "unlimited tokens" if entitlement.token_quota is None else f"{entitlement.token_quota} tokens"
        until = entitlement.ends_at.isoformat() if entitlement.ends_at else "no end"
        models = ", ".join(entitlement.model_names) or "every model"
        self.stdout.write(
            f"Redeemed for {organization.slug}: entitlement #{entitlement.pk}, {quota}, until {until}, models: {models}"
        )
