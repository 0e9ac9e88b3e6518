"""`manage.py issue_codes --count N [...]`: make a batch of authorization codes, one per line on stdout."""

from django.core.management.base import BaseCommand, CommandError

from accounts.forms_codes import IssueCodesForm

# Command-line option -> form field: the command and the admin page share one validation.
OPTIONS = {
    "count": "count",
    "tokens": "token_quota",
    "days": "validity_days",
    "models": "model_names",
    "max_redemptions": "max_redemptions",
    "expires": "expires_on",
    "note": "note",
}


class Command(BaseCommand):
    help = "Issue authorization codes. Prints each code once, one per line; only their hashes are stored."

    def add_arguments(self, parser):
        parser.add_argument("--count", required=True, help="How many codes to make.")
        parser.add_argument("--tokens", help="Token quota each redemption grants (default: unlimited).")
        parser.add_argument("--days", help="Validity in days after redemption (default: no end).")
        parser.add_argument("--models", help="Comma-separated model names (default: every model).")
        parser.add_argument("--max-redemptions", default="1", help="Redemptions allowed per code (default 1).")
        parser.add_argument("--expires", help="Last day a code can be redeemed, YYYY-MM-DD (UTC; default: never).")
        parser.add_argument("--note", default="", help="Operator note stored with the batch.")

    def handle(self, *args, **options):
        data = {field: options[option] for option, field in OPTIONS.items() if options.get(option) is not None}
        form = IssueCodesForm(data=data)
        if not form.is_valid():
            flag = {field: option.replace("_", "-") for option, field in OPTIONS.items()}
            problems = [f"--{flag.get(field, field)}: {' '.join(errors)}" for field, errors in form.errors.items()]
            raise CommandError("; ".join(problems))
        for issued in form.issue():
            self.stdout.write(issued.raw)
