"""maas.settings reads its configuration from the environment: each case runs a fresh interpreter with
the environment it names and reads the settings it produced."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from django.conf import settings

from tests.processes import ROOT

READ = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "db = s.DATABASES['default']; print(json.dumps({'engine': db['ENGINE'], 'name': db['NAME'], "
    "'host': db.get('HOST'), 'pool': db.get('OPTIONS', {}).get('pool'), 'test_name': db.get('TEST', {}).get('NAME'), "
    "'debug': s.DEBUG, 'secret': s.SECRET_KEY, 'hmac': s.API_KEY_HMAC_SECRET, 'hosts': s.ALLOWED_HOSTS, "
    "'cache': s.CACHES['default']['BACKEND'], 'ssl_redirect': s.SECURE_SSL_REDIRECT, 'email_port': s.EMAIL_PORT}))"
)
SETTINGS_ENV = ("DATABASE_URL", "DATABASE_POOL", "DEBUG", "SECRET_KEY", "API_KEY_HMAC_SECRET", "ALLOWED_HOSTS",
                "REDIS_URL", "SECURE_SSL_REDIRECT", "EMAIL_PORT", "TEST_DATABASE_NAME")


def settings_with(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    return subprocess.run([sys.executable, "-c", READ], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**clean, "DJANGO_SETTINGS_MODULE": "maas.settings", **env})


def read_settings(**env: str) -> dict:
    done = settings_with(**env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_test_run_uses_postgresql():
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    assert settings.AUTH_USER_MODEL == "accounts.User"
    assert not settings.DEBUG


def test_production_settings_come_from_environment():
    read = read_settings(
        DATABASE_URL="postgres://maas@db.internal:5433/platform", DATABASE_POOL="1", SECRET_KEY="s" * 50,
        API_KEY_HMAC_SECRET="h" * 50, ALLOWED_HOSTS="api.example.com, console.example.com",
        REDIS_URL="redis://cache.internal:6379/2", EMAIL_PORT="2525", TEST_DATABASE_NAME="test_x",
    )
    assert (read["engine"], read["name"], read["host"]) == ("django.db.backends.postgresql", "platform", "db.internal")
    assert read["pool"]["max_size"] == 20 and read["test_name"] == "test_x"
    assert (read["debug"], read["secret"], read["hmac"]) == (False, "s" * 50, "h" * 50)
    assert read["hosts"] == ["api.example.com", "console.example.com"]
    assert read["cache"] == "django.core.cache.backends.redis.RedisCache"
    assert read["ssl_redirect"] is True and read["email_port"] == 2525


def test_debug_defaults_are_embedded():
    read = read_settings(DEBUG="1")
    assert read["engine"] == "django.db.backends.sqlite3" and read["name"].endswith("db.sqlite3")
    assert read["debug"] is True and read["hmac"] == read["secret"]
    assert read["hosts"] == ["localhost", "127.0.0.1", "[::1]"] and read["ssl_redirect"] is False
    assert read["cache"] == "django.core.cache.backends.locmem.LocMemCache" and read["pool"] is None


@pytest.mark.parametrize(("env", "message"), [
    ({}, "SECRET_KEY must be set when DEBUG is off."),
    ({"SECRET_KEY": "s" * 50}, "API_KEY_HMAC_SECRET must be set when DEBUG is off"),
    ({"SECRET_KEY": "s" * 50, "API_KEY_HMAC_SECRET": "s" * 50}, "API_KEY_HMAC_SECRET must differ from SECRET_KEY."),
])
def test_production_refuses_to_start_without_its_secrets(env, message):
    done = settings_with(**env)
    assert done.returncode != 0 and "ImproperlyConfigured" in done.stderr and message in done.stderr
