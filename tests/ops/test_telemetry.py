"""maas/telemetry.py: nothing loaded without OTEL_* variables; Django, httpx, psycopg, Celery instrumented with them."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import sys, maas.asgi; from django.conf import settings; "
    "print(int('opentelemetry.sdk.trace' in sys.modules), "
    "int(any('opentelemetry' in m for m in settings.MIDDLEWARE)), "
    "int('opentelemetry.instrumentation.psycopg' in sys.modules), "
    "int('opentelemetry.instrumentation.celery' in sys.modules), "
    "int('opentelemetry.instrumentation.httpx' in sys.modules))"
)


def probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base.update(DJANGO_SETTINGS_MODULE="tests.settings", **env)
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=base, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_off_and_free_without_otel_variables():
    assert probe() == ["0", "0", "0", "0", "0"]
    assert probe(OTEL_TRACES_EXPORTER="none") == ["0", "0", "0", "0", "0"]


def test_on_with_an_otlp_endpoint():
    assert probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318") == ["1", "1", "1", "1", "1"]


def test_sdk_disabled_wins():
    assert probe(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4318", OTEL_SDK_DISABLED="true") == ["0", "0", "0", "0", "0"]
