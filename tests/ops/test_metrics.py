"""Gateway Prometheus metrics: the /metrics protection, and counters moved by real requests through a
uvicorn gateway process in front of the stub upstream."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from inference.models import Deployment
from tests.inference.conftest import add_model, make_tenant, start_gateway, start_stub_upstream
from tests.processes import stop

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TOKEN = "metrics-test-token"
MESSAGES = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
def stub():
    url, process = start_stub_upstream()
    yield url
    stop(process)


@pytest.fixture(scope="module")
def gateway(django_db_setup, django_db_blocker):
    url, process = start_gateway(METRICS_TOKEN=TOKEN)
    yield url
    stop(process)


def scrape(gateway: str) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{gateway}/metrics", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_needs_the_token(gateway, settings, client):
    assert httpx.get(f"{gateway}/metrics").status_code == 401
    wrong = httpx.get(f"{gateway}/metrics", headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer")
    assert "maas_gateway" not in wrong.text
    settings.METRICS_TOKEN = ""
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer ").status_code == 404


def test_requests_tokens_latency_rejections_and_health_are_counted(gateway, stub):
    add_model("stub-model", stub)
    dead = add_model("dead-model", "http://127.0.0.1:9")
    Deployment.objects.filter(model=dead).update(healthy=False)
    tenant = make_tenant("metered")
    poor = make_tenant("poor", token_quota=300)
    before = scrape(gateway)

    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)
    completion = client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=5)
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=f"{gateway}/v1", api_key=poor.raw_key, max_retries=0).chat.completions.create(
            model="stub-model", messages=MESSAGES
        )
    after = scrape(gateway)

    org = tenant.organization.slug
    ok = dict(model="stub-model", organization=org, status="200")
    assert value(after, "maas_gateway_requests_total", **ok) - value(before, "maas_gateway_requests_total", **ok) == 1
    rejected = dict(model="stub-model", organization=poor.organization.slug, status="429")
    assert value(after, "maas_gateway_requests_total", **rejected) == 1
    assert value(after, "maas_gateway_quota_rejections_total", organization=poor.organization.slug, reason="insufficient_quota") == 1
    assert value(after, "maas_gateway_prompt_tokens_total", model="stub-model", organization=org) == completion.usage.prompt_tokens
    assert value(after, "maas_gateway_completion_tokens_total", model="stub-model", organization=org) == 5
    assert value(after, "maas_gateway_request_duration_seconds_count", model="stub-model") >= 1
    assert value(after, "maas_gateway_time_to_first_token_seconds_count", model="stub-model") >= 1
    health = {labels: v for (name, labels), v in after.items() if name == "maas_gateway_deployment_healthy"}
    by_model = {dict(labels)["model"]: v for labels, v in health.items()}
    assert by_model == {"stub-model": 1.0, "dead-model": 0.0}


def test_upstream_errors_are_counted(gateway):
    add_model("gone-model", "http://127.0.0.1:9")  # nothing listens: connection refused
    tenant = make_tenant("unlucky")
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)
    with pytest.raises(openai.APIStatusError):
        client.chat.completions.create(model="gone-model", messages=MESSAGES, max_tokens=5)
    after = scrape(gateway)
    errors = [
        (dict(labels), v) for (name, labels), v in after.items()
        if name == "maas_gateway_upstream_errors_total" and dict(labels)["model"] == "gone-model"
    ]
    assert errors and errors[0][0]["kind"] == "upstream_unavailable" and errors[0][1] == 1


def test_metric_names_follow_prometheus_conventions(gateway):
    names = {name for name, _ in scrape(gateway)}
    ours = {n for n in names if n.startswith("maas_gateway_")}
    assert ours
    for name in ours:
        assert re.fullmatch(r"maas_gateway_[a-z_]+", name), name
        assert not name.endswith("_total_total")


def test_several_uvicorn_workers_report_the_same_totals(stub, tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR every worker process answers /metrics with the sum over all workers."""
    import os
    import subprocess
    import sys

    from tests.inference.conftest import REDIS_URL, test_database_url
    from tests.processes import ROOT, free_port, wait_until_up

    add_model("multi-model", stub)
    tenant = make_tenant("multi")
    port = free_port()
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": test_database_url(),
        "REDIS_URL": REDIS_URL, "GATEWAY_CATALOG_CACHE_SECONDS": "0", "METRICS_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "LOG_LEVEL": "WARNING",
    }
    env.pop("TEST_DATABASE_NAME", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "maas.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--log-level", "warning", "--no-access-log"], cwd=ROOT, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/health", process)
        for _ in range(6):  # fresh connections: spread over both workers
            with openai.OpenAI(base_url=f"{url}/v1", api_key=tenant.raw_key, max_retries=0) as client:
                client.chat.completions.create(model="multi-model", messages=MESSAGES, max_tokens=2)
        labels = dict(model="multi-model", organization=tenant.organization.slug, status="200")
        seen = {value(scrape(url), "maas_gateway_requests_total", **labels) for _ in range(8)}
        assert seen == {6.0}
        assert len(list(tmp_path.glob("counter_*.db"))) >= 1
    finally:
        stop(process)
