"""compose.yaml checked by parsing (Docker is not available on the test machines)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SECRET_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|API_KEY")
REFERENCE = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(:?[-?][^}]*)?\}$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_services_present(compose):
    services = compose["services"]
    for name in ("postgres", "redis", "migrate", "web", "worker", "beat", "otel-collector"):
        assert name in services, name
    engines = [name for name in services if name.startswith("engine-")]
    assert engines, "one engine service per model"


def test_every_long_running_service_has_health_check_and_restart_policy(compose):
    for name, service in compose["services"].items():
        if name == "migrate":
            assert service["restart"] == "no"
            continue
        assert service.get("restart") in {"unless-stopped", "always"}, name
        check = service.get("healthcheck")
        assert check and check["test"] and check["interval"], name


def test_no_secret_inline(compose):
    """Secret-looking variables are only ${...} references (filled from .env), never literal values."""
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            value = str(value)
            if SECRET_NAME.search(key):
                assert REFERENCE.match(value), f"{name}.{key} must come from .env"
            # Credentials inside URLs must be references too.
            for credential in re.findall(r"://[^:/@]+:([^@]+)@", value):
                assert REFERENCE.match(credential), f"{name}.{key} has an inline password"
        assert "env_file" not in service or service["env_file"] == ".env"
    text = (ROOT / "compose.yaml").read_text()
    assert "SECRET_KEY=" not in text and "SECRET_KEY:" not in text


def test_env_example_lists_every_referenced_variable():
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    referenced = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "compose.yaml").read_text()))
    assert referenced <= example, referenced - example
    for required in ("SECRET_KEY", "API_KEY_HMAC_SECRET", "POSTGRES_PASSWORD", "METRICS_TOKEN", "ALLOWED_HOSTS"):
        assert required in example
    assert not [line for line in (ROOT / ".env.example").read_text().splitlines() if line.startswith("SECRET_KEY=") and line != "SECRET_KEY="]
    hosts = next(line for line in (ROOT / ".env.example").read_text().splitlines() if line.startswith("ALLOWED_HOSTS="))
    collector = yaml.safe_load((ROOT / "platform/otel-collector.yaml").read_text())
    for job in collector["receivers"]["prometheus"]["config"]["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host = target.split(":")[0]
            if host == "web":  # Django checks the Host header of the scrape
                assert "web" in hosts.split("=", 1)[1].split(",")
            else:
                assert host in yaml.safe_load((ROOT / "compose.yaml").read_text())["services"], host


def test_web_worker_beat_run_the_real_processes(compose):
    services = compose["services"]
    web = " ".join(services["web"]["command"])
    assert "uvicorn maas.asgi:application" in web and "--workers" in web
    assert services["web"]["environment"]["PROMETHEUS_MULTIPROC_DIR"] in services["web"]["tmpfs"]
    assert "celery -A maas worker" in " ".join(services["worker"]["command"])
    assert services["beat"]["command"][:4] == ["celery", "-A", "maas", "beat"]
    for name in ("web", "worker", "beat"):
        env = services[name]["environment"]
        assert env["CELERY_BROKER_URL"].startswith("redis://redis:")
        assert env["DATABASE_URL"].startswith("postgres://")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"
        assert services[name]["build"]["dockerfile"] == "platform/Dockerfile.web"
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_a_batch_worker_serves_the_batch_queue_with_the_files_the_web_stores(compose):
    from django.conf import settings

    services = compose["services"]
    command = " ".join(services["batch-worker"]["command"])
    assert "celery -A maas worker" in command and f"-Q {settings.BATCH_QUEUE}" in command
    assert f"-Q {settings.BATCH_QUEUE}" not in " ".join(services["worker"]["command"])
    directory = services["web"]["environment"]["BATCH_FILES_DIR"]
    for name in ("web", "worker", "batch-worker"):  # uploads, purges and the runner: one storage
        assert services[name]["environment"]["BATCH_FILES_DIR"] == directory
        assert f"batchfiles:{directory}" in services[name]["volumes"], name
    assert "batchfiles" in compose["volumes"]


def test_engine_reserves_a_gpu_and_mounts_models(compose):
    for name, service in compose["services"].items():
        if not name.startswith("engine-"):
            continue
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["count"] >= 1
        assert any(v.endswith(":/models:ro") for v in service["volumes"])
        assert service["build"]["dockerfile"] == "platform/Dockerfile.engine"
        assert "python -m engine serve" in " ".join(service["command"])
        assert service["environment"]["OTEL_SERVICE_NAME"].startswith("maas-engine")


def test_the_launcher_runs_platform_replicas_with_the_models_and_a_gpu(compose):
    launcher = compose["services"]["launcher"]
    assert launcher["command"] == ["python", "manage.py", "launcher"]
    assert launcher["build"]["dockerfile"] == "platform/Dockerfile.web"  # Django and the engine package
    env = launcher["environment"]
    mount = next(v for v in launcher["volumes"] if v.endswith(":ro"))
    assert mount.split(":")[-2] == env["MODELS_DIR"] == "/models"
    assert any(v.endswith(":" + env["LAUNCHER_STATE_DIR"]) for v in launcher["volumes"])
    assert env["LAUNCHER_STATE_DIR"] in " ".join(launcher["healthcheck"]["test"])  # the heartbeat file
    # Engines listen on every interface of the container and are registered under the service's name.
    assert env["LAUNCHER_BIND_HOST"] == "0.0.0.0" and env["LAUNCHER_HOST"] == "launcher"
    low, high = map(int, env["LAUNCHER_PORT_RANGE"].split("-"))
    assert 1024 < low < high < 65536
    assert launcher["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert launcher["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert env["DATABASE_URL"].startswith("postgres://")


def test_named_volumes_and_platform_files(compose):
    assert {"pgdata", "redisdata", "beatdata", "launcherdata"} <= set(compose["volumes"])
    assert "pgdata:/var/lib/postgresql/data" in compose["services"]["postgres"]["volumes"]
    for path in ("platform/Dockerfile.web", "platform/Dockerfile.engine", "platform/otel-collector.yaml"):
        assert (ROOT / path).is_file(), path
    collector = yaml.safe_load((ROOT / "platform/otel-collector.yaml").read_text())
    assert "otlp" in collector["service"]["pipelines"]["traces"]["receivers"]
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")


def test_check_deploy_passes_under_production_settings(tmp_path):
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "SECRET_KEY": "k8Jq2vX9mZ4tR7wB1nL5cF3hY6pD0sG8aE2uI4oK7jM9bV1xN3zQ5rT7yU9wC2eA",
        "API_KEY_HMAC_SECRET": "a-separate-hmac-secret-for-api-keys-7f3b9c1d5e",
        "ALLOWED_HOSTS": "maas.example.com",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
        "REDIS_URL": "redis://127.0.0.1:6379/4",
        "METRICS_TOKEN": "metrics-token",
        "DJANGO_SETTINGS_MODULE": "maas.settings",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
