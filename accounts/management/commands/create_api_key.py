"""`manage.py create_api_key --org SLUG --name NAME [...]`: prints a new key (shown this once only)."""

from __future__ import annotations

from datetime import UTC, datetime

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from accounts.forms import parse_model_list, validate_future
from accounts.models import APIKey, KeyKind, Organization


def parse_expiry(text: str) -> datetime:
    """YYYY-MM-DD (midnight UTC) or an ISO 8601 datetime (UTC unless it says otherwise)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"--expires: {text!r} is not a date (YYYY-MM-DD) or ISO 8601 datetime.") from exc
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


class Command(BaseCommand):
    help = "Create an API key for an organization and print it (the only time it is shown)."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, metavar="SLUG")
        parser.add_argument("--name", required=True)
        parser.add_argument("--expires", metavar="YYYY-MM-DD|ISO-DATETIME")
        parser.add_argument("--models", metavar="a,b", help="Allowed models (default: every model).")
        parser.add_argument("--requests-per-minute", type=positive, metavar="N")
        parser.add_argument("--tokens-per-minute", type=positive, metavar="N")

    def handle(self, *args, org: str, name: str, expires, models, requests_per_minute, tokens_per_minute, **options):
        organization = Organization.objects.filter(slug=org).first()
        if organization is None:
            raise CommandError(f"No organization with slug {org!r}.")
        name = name.strip()
        if not name or len(name) > 100:
            raise CommandError("--name must be 1 to 100 characters.")
        try:
            expires_at = validate_future(parse_expiry(expires)) if expires else None
            allowed_models = parse_model_list(models or "")
        except ValidationError as exc:
            raise CommandError(" ".join(exc.messages)) from exc
        key, raw = APIKey.objects.create_key(
            organization,
            name,
            kind=KeyKind.SERVICE,  # an operator's key belongs to the organization
            expires_at=expires_at,
            allowed_models=allowed_models,
            requests_per_minute=requests_per_minute,
            tokens_per_minute=tokens_per_minute,
        )
        self.stderr.write(f"Created key {key.redacted} ({key.name}) for {organization.slug}; store it now, it is not shown again.")
        self.stdout.write(raw)
