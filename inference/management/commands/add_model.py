"""`manage.py add_model NAME --engine-url URL [...]`: add (or update) a catalog model and its deployment."""

from decimal import Decimal, InvalidOperation

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import URLValidator
from django.db import transaction

from accounts.models import Organization
from inference.models import AIModel, Deployment, ModelKind, ToolFormat, Visibility


def price(value: str) -> Decimal:
    try:
        number = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"Not a price: {value!r}") from None
    if number < 0:
        raise CommandError(f"Prices cannot be negative: {value}")
    return number


class Command(BaseCommand):
    help = "Add a model to the catalog (or update it) with one engine deployment."

    def add_arguments(self, parser):
        parser.add_argument("name", help="Public model name clients send as `model`.")
        parser.add_argument("--engine-url", required=True, help="Engine root URL, e.g. http://127.0.0.1:8001")
        parser.add_argument("--internal-token", default="", help="Bearer token the engine expects, if any.")
        parser.add_argument("--served-model-name", default="", help="The model id the engine serves, if not NAME.")
        parser.add_argument("--weight", type=int, default=1)
        parser.add_argument("--display-name", default="")
        parser.add_argument("--description", default="")
        parser.add_argument("--context-length", type=int, default=2048)
        parser.add_argument("--price-input", type=price, default=Decimal(0), help="Per million input tokens.")
        parser.add_argument("--price-cached-input", type=price, default=Decimal(0), help="Per million cached input tokens.")
        parser.add_argument("--price-output", type=price, default=Decimal(0), help="Per million output tokens.")
        parser.add_argument(
            "--visibility", default="all",
            help="'all', or a comma-separated list of organization slugs that may use the model.",
        )
        parser.add_argument("--tool-format", choices=[c.value for c in ToolFormat], default=ToolFormat.AUTO.value,
                            help="How tools reach the prompt: auto (the chat template if it supports tools, else "
                                 "Hermes-style) or hermes.")
        parser.add_argument("--kind", choices=[c.value for c in ModelKind], default=ModelKind.CHAT.value,
                            help="chat (serves /v1/chat/completions and /v1/completions) or embeddings "
                                 "(serves /v1/embeddings).")
        parser.add_argument("--disabled", action="store_true", help="Add it disabled.")

    @transaction.atomic
    def handle(self, *args, **options):
        url = options["engine_url"].rstrip("/")
        try:
            URLValidator(schemes=["http", "https"])(url)
        except ValidationError:
            raise CommandError(f"Not an http(s) URL: {url}") from None
        if options["context_length"] < 1:
            raise CommandError("--context-length must be positive.")
        if options["weight"] < 1:
            raise CommandError("--weight must be positive.")
        orgs = []
        if options["visibility"] != "all":
            slugs = [s.strip() for s in options["visibility"].split(",") if s.strip()]
            orgs = list(Organization.objects.filter(slug__in=slugs))
            missing = set(slugs) - {o.slug for o in orgs}
            if missing or not slugs:
                raise CommandError(f"Unknown organizations: {', '.join(sorted(missing)) or '(none given)'}")
        model, created = AIModel.objects.update_or_create(
            name=options["name"],
            defaults={
                "display_name": options["display_name"] or options["name"],
                "description": options["description"],
                "context_length": options["context_length"],
                "tool_format": options["tool_format"],
                "kind": options["kind"],
                "enabled": not options["disabled"],
                "visibility": Visibility.ALL if not orgs else Visibility.LISTED,
                "price_input_per_million": options["price_input"],
                "price_cached_input_per_million": options["price_cached_input"],
                "price_output_per_million": options["price_output"],
            },
        )
        model.organizations.set(orgs)
        Deployment.objects.update_or_create(
            model=model, base_url=url,
            defaults={
                "internal_token": options["internal_token"], "served_model_name": options["served_model_name"],
                "weight": options["weight"], "enabled": True,
            },
        )
        verb = "Added" if created else "Updated"
        self.stdout.write(self.style.SUCCESS(f"{verb} model {model.name} served by {url}"))
