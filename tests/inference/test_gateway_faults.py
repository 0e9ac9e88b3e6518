"""Upstream and infrastructure failures: a clean OpenAI error for the client, the reservation settled,
one usage row with the error status. Real processes: the gateway under uvicorn, the stub upstream
with purpose-built faults, unreachable ports for a dead engine, PostgreSQL and Redis."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from accounts.models import Entitlement
from inference.catalog import check_deployments
from inference.models import Deployment, Reservation, UsageRecord, UsageStatus

from .conftest import add_model, free_port, make_tenant, start_gateway, stop

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

MESSAGES = [{"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def gateway(django_db_setup, redis_clean):
    """This module's gateway gives up on a silent engine after 3 s."""
    url, process = start_gateway(GATEWAY_UPSTREAM_READ_TIMEOUT="3")
    yield url
    stop(process)


@pytest.fixture
def tenant(stub_upstream):
    add_model("stub-model", stub_upstream)
    return make_tenant()


def client_for(gateway, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=tenant.raw_key, max_retries=0)


def settled(tenant, used: int) -> None:
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert (entitlement.tokens_used, entitlement.tokens_reserved) == (used, 0)
    assert not Reservation.objects.exists()


def wait_for_usage_row() -> UsageRecord:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = UsageRecord.objects.first()
        if row is not None:
            return row
        time.sleep(0.05)
    raise AssertionError("no usage row")


def test_engine_down_is_503_and_recorded(gateway, stub_upstream):
    add_model("down-model", f"http://127.0.0.1:{free_port()}")
    tenant = make_tenant()
    with pytest.raises(openai.InternalServerError) as err:
        client_for(gateway, tenant).chat.completions.create(model="down-model", messages=MESSAGES, max_tokens=5)
    assert err.value.status_code == 503 and err.value.code == "service_unavailable"
    row = UsageRecord.objects.get()
    assert row.status == UsageStatus.UPSTREAM_UNAVAILABLE and row.http_status == 503
    assert (row.prompt_tokens, row.completion_tokens) == (0, 0)
    settled(tenant, 0)


def test_unreachable_replica_is_skipped_for_a_healthy_one(gateway, stub_upstream):
    model = add_model("two-replicas", f"http://127.0.0.1:{free_port()}")
    Deployment.objects.create(model=model, base_url=stub_upstream)
    tenant = make_tenant()
    client = client_for(gateway, tenant)
    for _ in range(3):
        assert client.chat.completions.create(model="two-replicas", messages=MESSAGES, max_tokens=2).choices
    assert {r.status for r in UsageRecord.objects.all()} == {UsageStatus.OK}


def test_no_healthy_deployment_is_503_and_health_checks_update_state(gateway, stub_upstream):
    model = add_model("sick-model", f"http://127.0.0.1:{free_port()}")
    Deployment.objects.create(model=model, base_url=stub_upstream)
    assert check_deployments() == {"healthy": 1, "unhealthy": 1}
    Deployment.objects.filter(base_url=stub_upstream).update(healthy=False)
    tenant = make_tenant()
    with pytest.raises(openai.InternalServerError) as err:
        client_for(gateway, tenant).chat.completions.create(model="sick-model", messages=MESSAGES)
    assert err.value.status_code == 503
    assert not UsageRecord.objects.exists()  # never forwarded
    settled(tenant, 0)
    # The next check finds the stub healthy again (the dead port stays unhealthy) and requests reach it.
    assert check_deployments() == {"healthy": 1, "unhealthy": 1}
    stub = Deployment.objects.get(base_url=stub_upstream)
    assert stub.healthy and Deployment.objects.get(model=model, healthy=False).base_url != stub_upstream
    reply = client_for(gateway, tenant).chat.completions.create(model="sick-model", messages=MESSAGES, max_tokens=2)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 2
    row = UsageRecord.objects.get()
    assert (row.status, row.deployment_id) == (UsageStatus.OK, stub.pk)


def test_engine_timing_out_is_504_and_recorded(gateway, tenant):
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as err:
        client_for(gateway, tenant).chat.completions.create(
            model="stub-model", messages=MESSAGES, max_tokens=5, user="stub:stall"
        )
    assert err.value.status_code == 504 and err.value.code == "upstream_timeout"
    assert time.monotonic() - started < 10  # the gateway's read timeout is 3 s in the test process
    row = UsageRecord.objects.get()
    assert row.status == UsageStatus.UPSTREAM_TIMEOUT
    settled(tenant, 0)


def test_engine_500_is_502_and_recorded(gateway, tenant):
    with pytest.raises(openai.InternalServerError) as err:
        client_for(gateway, tenant).chat.completions.create(
            model="stub-model", messages=MESSAGES, max_tokens=5, user="stub:error500"
        )
    assert err.value.status_code == 502
    assert UsageRecord.objects.get().status == UsageStatus.UPSTREAM_ERROR
    settled(tenant, 0)


@pytest.mark.parametrize(("mode", "status"), [("close_midway", UsageStatus.UPSTREAM_ERROR),
                                              ("stall_midway", UsageStatus.UPSTREAM_TIMEOUT)])
def test_stream_broken_midway_ends_with_error_event_and_charges_what_was_generated(gateway, stub_upstream, tenant, mode, status):
    stream = client_for(gateway, tenant).chat.completions.create(
        model="stub-model", messages=MESSAGES, max_tokens=8, stream=True, user="stub:" + mode
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk.choices[0].delta.content if chunk.choices else None)
    assert "".join(filter(None, received)) == "Hello from the"
    row = wait_for_usage_row()
    assert row.status == status and row.stream
    prompt = httpx.post(f"{stub_upstream}/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert (row.prompt_tokens, row.completion_tokens) == (prompt, 3)
    settled(tenant, prompt + 3)


def test_client_disconnect_cancels_upstream_and_charges_generated_tokens(gateway, stub_upstream, tenant):
    body = {"model": "stub-model", "messages": MESSAGES, "max_tokens": 200, "stream": True, "user": "stub:slow_stream"}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {tenant.raw_key}"}, timeout=30) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        data = []
        for line in lines:
            if line.startswith("data:"):
                data.append(line)
            if len(data) == 4:
                break
    row = wait_for_usage_row()
    assert row.request_id == request_id and row.status == UsageStatus.CLIENT_DISCONNECTED
    event = httpx.get(f"{stub_upstream}/_requests").json()["events"][request_id]
    deadline = time.monotonic() + 5
    while not event["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.05)
        event = httpx.get(f"{stub_upstream}/_requests").json()["events"][request_id]
    assert event["cancelled"] and not event["finished"]  # generation stopped at once
    assert 3 <= row.completion_tokens <= event["yielded"] < 200
    settled(tenant, row.prompt_tokens + row.completion_tokens)


def test_database_unreachable_is_503_never_401(django_db_setup):
    url, process = start_gateway(
        DATABASE_URL=f"postgres://postgres@127.0.0.1:{free_port()}/nothing", DATABASE_POOL_TIMEOUT="1"
    )
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES},
                              headers={"authorization": "Bearer sk-0123456789abcdef-" + "a" * 43}, timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "server_error"
        assert httpx.get(f"{url}/v1/models").status_code == 401  # no key at all is still the caller's fault
    finally:
        stop(process)


@pytest.mark.parametrize("policy", ["refuse", "local"])
def test_redis_unreachable_policy(stub_upstream, policy):
    add_model("stub-model", stub_upstream)
    tenant = make_tenant(requests_per_minute=2)
    url, process = start_gateway(
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", GATEWAY_RATELIMIT_ON_REDIS_ERROR=policy
    )
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=tenant.raw_key, max_retries=0)
        if policy == "refuse":
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=2)
            assert err.value.status_code == 503
            assert not UsageRecord.objects.exists()
        else:
            for _ in range(2):
                client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=2)
            with pytest.raises(openai.RateLimitError):  # the per-process buckets still enforce the limit
                client.chat.completions.create(model="stub-model", messages=MESSAGES, max_tokens=2)
            assert UsageRecord.objects.count() == 2
    finally:
        stop(process)
