"""A real OpenID Connect provider for the SSO tests (django-oauth-toolkit, tests/sso_provider/) in its own
process, and the console settings that point allauth's OIDC provider at it."""

from __future__ import annotations

import functools
import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..processes import ROOT, free_port, stop, wait_until_up

PROVIDER_ID = "corp-idp"
PROVIDER_NAME = "Corp IdP"
IDP_PASSWORD = "idp-password-for-tests-7"
# People at the provider: (username, email, whether the provider says the email is verified).
IDP_USERS = [
    ("alice", "alice@acme.example", True),
    ("bob", "bob@other.example", True),
    ("carol", "carol@acme.example", True),
    ("mallory", "mallory@acme.example", False),
]


@dataclass
class Provider:
    issuer: str
    client_id: str
    client_secret: str
    process: subprocess.Popen = field(repr=False)

    def environment(self, **extra: str) -> dict[str, str]:
        """The console's SSO_* variables for this provider."""
        return {
            "SSO_OIDC_SERVER_URL": self.issuer,
            "SSO_OIDC_CLIENT_ID": self.client_id,
            "SSO_OIDC_CLIENT_SECRET": self.client_secret,
            "SSO_OIDC_PROVIDER_ID": PROVIDER_ID,
            "SSO_OIDC_PROVIDER_NAME": PROVIDER_NAME,
            **extra,
        }


def rsa_private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


@pytest.fixture(scope="module")
def oidc_provider(live_server, tmp_path_factory) -> Provider:
    """The provider on 127.0.0.1 (the console is on localhost: no cookie is shared), with IDP_USERS and one
    confidential application whose redirect URI is the console's allauth callback."""
    directory = tmp_path_factory.mktemp("idp")
    port = free_port()
    issuer = f"http://127.0.0.1:{port}/o"
    client_id, client_secret = secrets.token_hex(12), secrets.token_urlsafe(24)
    spec = {
        "users": [
            {"username": name, "email": email, "password": IDP_PASSWORD, "email_verified": verified}
            for name, email, verified in IDP_USERS
        ],
        "application": {
            "client_id": client_id,
            "client_secret": client_secret,
            "redirect_uri": f"{live_server.url}/accounts/oidc/{PROVIDER_ID}/login/callback/",
        },
    }
    (directory / "spec.json").write_text(json.dumps(spec))
    env = {
        "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "IDP_DIR": str(directory), "IDP_ISSUER": issuer,
        "IDP_RSA_PRIVATE_KEY": rsa_private_key_pem(), "DJANGO_SETTINGS_MODULE": "tests.sso_provider.settings",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.sso_provider.serve", str(port), str(directory / "spec.json")], cwd=ROOT, env=env
    )
    try:
        wait_until_up(f"{issuer}/.well-known/openid-configuration", process, timeout=120, status=200)
        yield Provider(issuer, client_id, client_secret, process)
    finally:
        stop(process)


SSO_SETTINGS = ("SOCIALACCOUNT_PROVIDERS", "SSO_DOMAIN_ORGANIZATIONS", "CONTENT_SECURITY_POLICY",
                "SOCIALACCOUNT_EMAIL_AUTHENTICATION", "SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT")


@functools.lru_cache
def derived_settings(environment: tuple[tuple[str, str], ...]) -> dict:
    """SSO_SETTINGS as maas/settings.py derives them from `environment` (read in a fresh interpreter)."""
    code = ("import json, django; django.setup(); from django.conf import settings as s; "
            f"print(json.dumps({{name: getattr(s, name) for name in {SSO_SETTINGS!r}}}))")
    env = {"PATH": os.environ["PATH"], "DJANGO_SETTINGS_MODULE": "tests.settings", **dict(environment)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def configure_sso(settings, environment: dict[str, str]) -> None:
    """The running console (live server) takes the settings maas/settings.py makes of these SSO_* variables."""
    for name, value in derived_settings(tuple(sorted(environment.items()))).items():
        setattr(settings, name, value)
