"""Real processes for the gateway tests: the gateway under uvicorn (maas.asgi), the stub upstream with
purpose-built faults, and (for the end-to-end tests) `python -m engine serve` on SmolLM2.

The gateway process reads the test database pytest-django created, so tests that talk to it use
`transaction=True` (their rows are committed and visible to it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from tests.processes import ROOT, free_port, start_engine, stop, wait_until_up

# The gateway processes' Redis database for the test run (a parallel run on the same machine picks another).
REDIS_DB = int(os.environ.get("TEST_GATEWAY_REDIS_DB", "6"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"


def start_stub_upstream() -> tuple[str, subprocess.Popen]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/inference/stub_upstream.py"), "--port", str(port)], cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/health", process)
    return url, process


def test_database_url() -> str:
    from django.db import connection

    settings = connection.settings_dict
    host = settings.get("HOST") or "127.0.0.1"
    port = settings.get("PORT") or 5432
    user = settings.get("USER") or "postgres"
    return f"postgres://{user}@{host}:{port}/{settings['NAME']}"


def start_gateway(**env_overrides: str) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": test_database_url(),
        "DATABASE_POOL": "1",
        "REDIS_URL": REDIS_URL,
        "GATEWAY_CATALOG_CACHE_SECONDS": "0",
        "GATEWAY_UPSTREAM_READ_TIMEOUT": "60",
        "GATEWAY_UNHEALTHY_BACKOFF_SECONDS": "1",
        # a loaded 2-core CI machine can keep Redis from answering a burst within the production 0.5 s
        "GATEWAY_REDIS_TIMEOUT": "3",
        "LOG_LEVEL": "WARNING",
    }
    env.pop("TEST_DATABASE_NAME", None)
    env.update(env_overrides)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "maas.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--timeout-keep-alive", "75"],
        cwd=ROOT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_up(f"{url}/v1/models", process)
    return url, process


@pytest.fixture(scope="session")
def redis_clean():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def stub_upstream():
    url, process = start_stub_upstream()
    yield url
    stop(process)


@pytest.fixture(scope="session")
def gateway(django_db_setup, redis_clean):
    url, process = start_gateway()
    yield url
    stop(process)


@dataclass
class Tenant:
    organization: object
    user: object
    api_key: object
    raw_key: str
    entitlement: object


def make_tenant(
    name: str = "acme",
    token_quota: int | None = 1_000_000,
    model_names: list[str] | None = None,
    **key_fields,
) -> Tenant:
    """A user and organization holding a redeemed authorization code and an API key."""
    from accounts.codes import issue_codes, redeem
    from accounts.models import APIKey, User
    from accounts.tenancy import create_organization

    user = User.objects.create_user(f"{name}-{time.monotonic_ns()}@example.com", "pw-not-used-123")
    organization = create_organization(user, name)
    code = issue_codes(1, token_quota=token_quota, model_names=model_names or [])[0]
    entitlement = redeem(organization, code.raw, user)
    key, raw = APIKey.objects.create_key(organization, "test key", created_by=user, **key_fields)
    return Tenant(organization, user, key, raw, entitlement)


def in_thread(fn):
    """Run ORM code from an async test in a worker thread and give its connection back."""
    from asgiref.sync import sync_to_async
    from django.db import connections

    def run():
        try:
            return fn()
        finally:
            connections.close_all()
    return sync_to_async(run, thread_sensitive=False)()


def add_model(name: str, base_url: str, context_length: int = 2048, **fields):
    from inference.models import AIModel, Deployment

    model = AIModel.objects.create(name=name, display_name=name, context_length=context_length, **fields)
    Deployment.objects.create(model=model, base_url=base_url)
    return model


@pytest.fixture(scope="session")
def engine_server():
    """`python -m engine serve` on the SmolLM2 demo model, serving it as `smollm2`."""
    from engine.loader import demo_model_path

    process, url = start_engine(demo_model_path(), "--served-model-name", "smollm2", "--threads", "1",
                                "--max-model-len", "2048", "--log-level", "warning", "--keepalive-interval", "0.5")
    yield url
    stop(process)


EMBEDDING_MODEL = "all-minilm-l6-v2"


@pytest.fixture(scope="session")
def embedding_server():
    """`python -m engine serve` on the all-MiniLM-L6-v2 demo directory, serving it as `all-minilm-l6-v2`."""
    from engine.loader.encoder import demo_embedding_model_path

    process, url = start_engine(demo_embedding_model_path(), "--served-model-name", EMBEDDING_MODEL,
                                "--threads", "1", "--log-level", "warning")
    yield url
    stop(process)
