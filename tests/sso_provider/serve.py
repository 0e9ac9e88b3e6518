"""`python -m tests.sso_provider.serve PORT SPEC.json`: migrate the provider's database, create the users and
the OAuth application SPEC names, then serve on 127.0.0.1:PORT until terminated.

SPEC: {"users": [{"username", "password", "email", "email_verified"}],
       "application": {"client_id", "client_secret", "redirect_uri", "name"}}"""

import json
import os
import sys

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.sso_provider.settings")


def create(spec: dict) -> None:
    from django.contrib.auth.models import Group, User
    from oauth2_provider.models import Application

    from .validator import UNVERIFIED_GROUP

    for entry in spec["users"]:
        user = User.objects.create_user(entry["username"], entry["email"], entry["password"])
        if not entry.get("email_verified", True):
            user.groups.add(Group.objects.get_or_create(name=UNVERIFIED_GROUP)[0])
    app = spec["application"]
    Application.objects.create(
        name=app.get("name", "MaaS console"),
        client_id=app["client_id"],
        client_secret=app["client_secret"],
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=app["redirect_uri"],
        algorithm=Application.RS256_ALGORITHM,
        skip_authorization=False,
    )


def main() -> None:
    import django
    import uvicorn
    from django.core.asgi import get_asgi_application
    from django.core.management import call_command

    port, spec_path = int(sys.argv[1]), sys.argv[2]
    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    with open(spec_path) as f:
        create(json.load(f))
    uvicorn.run(get_asgi_application(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
