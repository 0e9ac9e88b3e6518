"""Production settings refuse unsafe defaults: a separate HMAC secret, HSTS without includeSubDomains/preload."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "k8Jq2vX9mZ4tR7wB1nL5cF3hY6pD0sG8aE2uI4oK7jM9bV1xN3zQ5rT7yU9wC2eA"
PRINT = "from django.conf import settings as s; print(s.API_KEY_HMAC_SECRET == s.SECRET_KEY, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_HSTS_PRELOAD)"


def load_settings(tmp_path, **env) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DJANGO_SETTINGS_MODULE": "maas.settings",
            "ALLOWED_HOSTS": "maas.example.com", "SECRET_KEY": SECRET}
    code = f"import django; django.setup(); {PRINT}"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60)


def test_production_refuses_to_start_without_its_own_hmac_secret(tmp_path):
    missing = load_settings(tmp_path)
    assert missing.returncode != 0 and "API_KEY_HMAC_SECRET must be set" in missing.stderr
    same = load_settings(tmp_path, API_KEY_HMAC_SECRET=SECRET)
    assert same.returncode != 0 and "must differ from SECRET_KEY" in same.stderr
    separate = load_settings(tmp_path, API_KEY_HMAC_SECRET="another-secret-for-keys-and-codes")
    assert separate.returncode == 0, separate.stderr
    assert separate.stdout.split()[0] == "False"


def test_development_may_share_the_secret(tmp_path):
    dev = load_settings(tmp_path, DEBUG="1")
    assert dev.returncode == 0, dev.stderr


def test_hsts_include_subdomains_and_preload_are_opt_in(tmp_path):
    default = load_settings(tmp_path, API_KEY_HMAC_SECRET="x-other-secret")
    assert default.stdout.split()[1:] == ["False", "False"]
    opted = load_settings(tmp_path, API_KEY_HMAC_SECRET="x-other-secret", SECURE_HSTS_INCLUDE_SUBDOMAINS="1",
                          SECURE_HSTS_PRELOAD="1")
    assert opted.stdout.split()[1:] == ["True", "True"]


@pytest.mark.django_db
def test_hsts_header_has_neither_subdomains_nor_preload_by_default(client):
    response = client.get("/health", secure=True)
    assert response["Strict-Transport-Security"] == "max-age=31536000"
