"""The Batch API end to end: the openai SDK → a gateway process → PostgreSQL and the batch files'
directory; a REAL Celery worker process (`celery -A maas worker`, Redis broker) runs the batches
against `python -m engine serve` on SmolLM2. Files, batches, their statuses and errors, billing per
line with the catalog's batch discount, quota refusals in the error file, and a worker killed with
SIGKILL mid-batch: every line answered once and billed once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
import redis
from django.utils import timezone

from accounts.models import Entitlement
from inference.batch_models import Batch, BatchLine
from inference.models import Reservation, UsageRecord, UsageSource
from tests.openapi_spec import validate_error, validate_response
from tests.processes import ROOT, stop

from . import conftest
from .conftest import EMBEDDING_MODEL, REDIS_URL, add_model, make_tenant, start_gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

RUN = uuid.uuid4().hex[:8]
BATCH_QUEUE, DEFAULT_QUEUE = f"batch-test-{RUN}", f"batch-test-default-{RUN}"
WAIT = 240.0  # a busy CI machine


def process_env(files_dir: Path) -> dict[str, str]:
    """What the gateway and the worker share: the test database, Redis (broker and rate limits), the
    files' directory, the queues, a short lease (a killed runner's batch is taken over after 2 s)."""
    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings", "DATABASE_URL": conftest.test_database_url(), "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": REDIS_URL, "CELERY_TASK_ALWAYS_EAGER": "0", "CELERY_TASK_DEFAULT_QUEUE": DEFAULT_QUEUE,
        "BATCH_QUEUE": BATCH_QUEUE, "BATCH_FILES_DIR": str(files_dir), "BATCH_LEASE_SECONDS": "2",
        "BATCH_MAX_FILE_BYTES": "200000", "BATCH_MAX_ACTIVE_PER_ORGANIZATION": "2", "BATCH_LINE_CONCURRENCY": "8",
        "GATEWAY_CATALOG_CACHE_SECONDS": "0", "LOG_LEVEL": "WARNING", "LOG_FORMAT": "text",
    }
    return env


class Worker:
    """`celery -A maas worker` on the batch and default queues of this run (solo pool: one task at a time;
    a batch's lines run on its own BATCH_LINE_CONCURRENCY threads)."""

    def __init__(self, files_dir: Path, log_path: Path):
        self.log_path = log_path
        env = {**os.environ, **process_env(files_dir)}
        env.pop("TEST_DATABASE_NAME", None)
        self.log = open(log_path, "a")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "maas", "worker", "-Q", f"{BATCH_QUEUE},{DEFAULT_QUEUE}",
             "--pool", "solo", "--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat",
             "--hostname", f"{BATCH_QUEUE}-{time.monotonic_ns()}@%h"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def batch_env(django_db_setup, django_db_blocker, redis_clean, tmp_path_factory):
    directory = tmp_path_factory.mktemp("batch")
    url, gateway = start_gateway(**process_env(directory / "files"))
    state = {"worker": Worker(directory / "files", directory / "worker.log"), "dir": directory}
    yield url, state
    state["worker"].kill()  # its state is the test database's, dropped next; a warm shutdown only costs time
    stop(gateway)
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(BATCH_QUEUE, DEFAULT_QUEUE)
    client.close()


@pytest.fixture
def gateway_url(batch_env):
    return batch_env[0]


@pytest.fixture
def smollm2(engine_server):
    return add_model("smollm2", engine_server, context_length=2048, price_input_per_million=2,
                     price_output_per_million=8, batch_discount_percent=50)


def client_for(url: str, tenant) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=tenant.raw_key, max_retries=0, timeout=60)


def jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def chat_line(custom_id: str, content: str = "Say hi.", max_tokens: int = 3, model: str = "smollm2",
              url: str = "/v1/chat/completions", **extra) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                     "temperature": 0, **extra}}


def slow_lines(prefix: str, count: int = 30) -> list[dict]:
    """Lines that each generate 48 tokens: a batch of them is still running when the test acts on it, on
    a quiet machine too (short lines finished before the cancel or the expiry could land)."""
    return [chat_line(f"{prefix}-{i}", max_tokens=48, ignore_eos=True) for i in range(count)]


ENDED = {"completed", "failed", "expired", "cancelled"}


def wait_for_status(client: openai.OpenAI, batch_id: str, statuses: set[str], timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert batch.status not in ENDED, f"batch {batch_id} ended {batch.status}: {batch.request_counts}"
        time.sleep(0.2)
    raise TimeoutError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch.request_counts}")


def output_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


# -- files ------------------------------------------------------------------------------------------------
def test_files_upload_list_retrieve_download_delete_on_the_spec(gateway_url):
    tenant = make_tenant("files-crud")
    client = client_for(gateway_url, tenant)
    data = jsonl([chat_line("a"), chat_line("b")])
    first = client.files.create(file=("requests.jsonl", data), purpose="batch")
    second = client.files.create(file=("more.jsonl", data), purpose="batch")
    assert first.id.startswith("file-") and first.bytes == len(data) and first.filename == "requests.jsonl"
    assert first.purpose == "batch" and first.object == "file"
    validate_response("/v1/files", "post", 200, first.model_dump(exclude_unset=True))

    assert client.files.retrieve(first.id).model_dump() == first.model_dump()
    assert client.files.content(first.id).content == data
    page = client.files.list(limit=1)
    assert [f.id for f in page.data] == [second.id] and page.has_more  # newest first
    validate_response("/v1/files", "get", 200, page.model_dump(exclude_unset=True))
    assert [f.id for f in client.files.list(limit=1, after=second.id).data] == [first.id]
    assert [f.id for f in client.files.list(order="asc").data] == [first.id, second.id]

    deleted = client.files.delete(first.id)
    assert (deleted.id, deleted.deleted) == (first.id, True)
    validate_response("/v1/files/{file_id}", "delete", 200, deleted.model_dump(exclude_unset=True))
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(first.id)


def test_file_uploads_refused_with_the_field_named(gateway_url):
    tenant = make_tenant("files-refused")
    headers = {"authorization": f"Bearer {tenant.raw_key}"}
    cases = [
        ({"purpose": "fine-tune"}, {"file": ("a.jsonl", b"{}\n")}, "purpose"),
        ({}, {"file": ("a.jsonl", b"{}\n")}, "purpose"),
        ({"purpose": "batch"}, None, "file"),
        ({"purpose": "batch"}, {"file": ("big.jsonl", b"x" * 200_001)}, "file"),  # BATCH_MAX_FILE_BYTES=200000
        ({"purpose": "batch", "colour": "red"}, {"file": ("a.jsonl", b"{}\n")}, "colour"),
    ]
    for data, upload, param in cases:
        response = httpx.post(f"{gateway_url}/v1/files", data=data, files=upload,
                              headers=headers, timeout=30)
        assert response.status_code == 400, (param, response.text)
        validate_error(response.json())
        assert response.json()["error"]["param"] == param
    unauthenticated = httpx.get(f"{gateway_url}/v1/files", timeout=30)
    assert unauthenticated.status_code == 401


# -- batches ---------------------------------------------------------------------------------------------
def test_a_batch_runs_to_completed_billed_per_line_at_the_batch_discount(gateway_url, smollm2):
    tenant = make_tenant("batch-basic")
    client = client_for(gateway_url, tenant)
    lines = [chat_line(f"line-{i}", f"Count to {i}.") for i in range(3)]
    lines.append(chat_line("too-long", max_tokens=10_000))  # the engine's 400: in the error file
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    created = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "nightly"})
    assert created.status in ("validating", "in_progress") and created.metadata == {"job": "nightly"}
    validate_response("/v1/batches", "post", 200, created.model_dump(exclude_unset=True))

    done = wait_for_status(client, created.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.model == "smollm2"
    validate_response("/v1/batches/{batch_id}", "get", 200, done.model_dump(exclude_unset=True))

    answered = output_lines(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in answered) == ["line-0", "line-1", "line-2"]
    for line in answered:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["object"] == "chat.completion"
        validate_response("/v1/chat/completions", "post", 200, line["response"]["body"])
    [refused] = output_lines(client, done.error_file_id)
    assert refused["custom_id"] == "too-long" and refused["response"]["status_code"] == 400
    validate_error(refused["response"]["body"])
    assert client.files.retrieve(done.output_file_id).purpose == "batch_output"

    records = list(UsageRecord.objects.filter(organization=tenant.organization).order_by("request_id"))
    assert len(records) == 4 and {r.source for r in records} == {UsageSource.BATCH}
    by_id = {r.request_id: r for r in records}
    for line in answered:
        usage, record = line["response"]["body"]["usage"], by_id[line["response"]["request_id"]]
        assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
        full = smollm2.cost(record.prompt_tokens, record.cached_tokens, record.completion_tokens)
        assert record.cost == (full / 2).quantize(Decimal("0.00000001")) and record.cost > 0
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert entitlement.tokens_used == sum(r.total_tokens for r in records) and entitlement.tokens_reserved == 0
    assert done.usage.total_tokens == entitlement.tokens_used


def test_responses_and_embeddings_batches(gateway_url, smollm2, embedding_server):
    add_model(EMBEDDING_MODEL, embedding_server, context_length=256, kind="embeddings", price_input_per_million=1)
    tenant = make_tenant("batch-endpoints")
    client = client_for(gateway_url, tenant)
    responses = [{"custom_id": f"r-{i}", "method": "POST", "url": "/v1/responses",
                  "body": {"model": "smollm2", "input": f"Say {word}.", "max_output_tokens": 3, "temperature": 0}}
                 for i, word in enumerate(["yes", "no"])]
    embeddings = [{"custom_id": f"e-{i}", "method": "POST", "url": "/v1/embeddings",
                   "body": {"model": EMBEDDING_MODEL, "input": text}} for i, text in enumerate(["a cat", "a dog"])]
    ids = {}
    for endpoint, lines in (("/v1/responses", responses), ("/v1/embeddings", embeddings)):
        upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        ids[endpoint] = client.batches.create(input_file_id=upload.id, endpoint=endpoint, completion_window="24h").id
    for endpoint, batch_id in ids.items():
        done = wait_for_status(client, batch_id, {"completed", "failed"})
        assert (done.status, done.request_counts.completed) == ("completed", 2), (endpoint, done)
        for line in output_lines(client, done.output_file_id):
            validate_response(endpoint, "post", 200, line["response"]["body"])
            if endpoint == "/v1/responses":  # stored (store defaults to true): retrievable like any response
                body = line["response"]["body"]
                assert client.responses.retrieve(body["id"]).output_text == body["output"][0]["content"][0]["text"]
            else:
                assert len(line["response"]["body"]["data"][0]["embedding"]) == 384
    endpoints = sorted(UsageRecord.objects.filter(organization=tenant.organization).values_list("endpoint", flat=True))
    assert endpoints == ["embeddings", "embeddings", "responses", "responses"]


def test_invalid_input_files_fail_with_their_errors(gateway_url, smollm2):
    tenant = make_tenant("batch-invalid")
    client = client_for(gateway_url, tenant)
    cases = {
        "invalid_json_line": jsonl([chat_line("a")]) + b"{not json\n",
        "invalid_url": jsonl([chat_line("a"), chat_line("b", url="/v1/completions")]),
        "duplicate_custom_id": jsonl([chat_line("a"), chat_line("a")]),
        "model_not_found": jsonl([chat_line("a", model="no-such-model")]),
        "mismatched_model": jsonl([chat_line("a"), chat_line("b", model="other")]),
        "empty_file": b"\n",
    }
    batches = {}
    for code, data in cases.items():
        upload = client.files.create(file=(f"{code}.jsonl", data), purpose="batch")
        batches[code] = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                              completion_window="24h").id
        if len(batches) % 2 == 0:  # BATCH_MAX_ACTIVE_PER_ORGANIZATION is 2 here
            for batch_id in batches.values():
                wait_for_status(client, batch_id, {"failed", "completed"})
    for code, batch_id in batches.items():
        batch = wait_for_status(client, batch_id, {"failed", "completed"})
        assert batch.status == "failed" and batch.failed_at, (code, batch.status)
        assert code in [e.code for e in batch.errors.data], (code, batch.errors)
        validate_response("/v1/batches/{batch_id}", "get", 200, batch.model_dump(exclude_unset=True))
    lines = {code: [e.line for e in client.batches.retrieve(b).errors.data] for code, b in batches.items()}
    assert lines["invalid_json_line"] == [2] and lines["invalid_url"] == [2] and lines["duplicate_custom_id"] == [2]
    assert not UsageRecord.objects.filter(organization=tenant.organization).exists()


def test_create_refusals_name_the_field(gateway_url, smollm2):
    tenant, other = make_tenant("batch-create-refused"), make_tenant("batch-create-other")
    client = client_for(gateway_url, tenant)
    upload = client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    foreign = client_for(gateway_url, other).files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
    headers = {"authorization": f"Bearer {tenant.raw_key}"}
    base = {"input_file_id": upload.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    for change, status, param in [({"completion_window": "1h"}, 400, "completion_window"),
                                  ({"endpoint": "/v1/images/generations"}, 400, "endpoint"),
                                  ({"priority": "high"}, 400, "priority"),
                                  ({"input_file_id": foreign.id}, 404, "id"),
                                  ({"metadata": {"k": 1}}, 400, "metadata")]:
        response = httpx.post(f"{gateway_url}/v1/batches", json={**base, **change}, headers=headers, timeout=30)
        assert response.status_code == status, (change, response.text)
        validate_error(response.json())
        assert response.json()["error"]["param"] == param
    assert not Batch.objects.filter(organization=tenant.organization).exists()
    # BATCH_MAX_ACTIVE_PER_ORGANIZATION (2 here): a third active batch is refused, and not retried by the SDK.
    for _ in range(2):
        Batch.objects.create(organization=tenant.organization, endpoint="/v1/chat/completions", status="cancelling",
                             input_file_name=upload.id, expires_at=timezone.now() + timedelta(days=1))
    response = httpx.post(f"{gateway_url}/v1/batches", json=base, headers=headers, timeout=30)
    assert response.status_code == 429 and response.json()["error"]["code"] == "batch_limit_exceeded"
    assert response.headers["x-should-retry"] == "false"
    validate_error(response.json())


def test_quota_refusals_land_in_the_error_file_and_the_quota_is_never_overspent(gateway_url, smollm2):
    tenant = make_tenant("batch-quota", token_quota=150)
    client = client_for(gateway_url, tenant)
    lines = [chat_line(f"q-{i}", max_tokens=20) for i in range(8)]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    done = wait_for_status(client, batch.id, {"completed", "failed"})
    assert done.status == "completed"
    refused = output_lines(client, done.error_file_id)
    assert refused and done.request_counts.failed == len(refused) and done.request_counts.completed >= 1
    for line in refused:
        assert line["response"]["status_code"] == 429
        assert line["response"]["body"]["error"]["code"] == "insufficient_quota"
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    records = UsageRecord.objects.filter(organization=tenant.organization)
    assert records.count() == done.request_counts.completed
    assert entitlement.tokens_used == sum(r.total_tokens for r in records) <= 150
    assert entitlement.tokens_reserved == 0


def test_cancel_stops_the_batch_and_lists_paginate(gateway_url, smollm2):
    tenant = make_tenant("batch-cancel")
    client = client_for(gateway_url, tenant)
    lines = slow_lines("c")
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for_status(client, batch.id, {"in_progress"})
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    validate_response("/v1/batches/{batch_id}/cancel", "post", 200, cancelling.model_dump(exclude_unset=True))
    done = wait_for_status(client, batch.id, {"cancelled"})
    assert done.cancelled_at and done.cancelling_at
    counts = done.request_counts
    assert counts.total == 30 and counts.completed + counts.failed == 30 and counts.completed < 30
    skipped = [line for line in output_lines(client, done.error_file_id) if line["error"]]
    assert len(skipped) == 30 - counts.completed
    assert {line["error"]["code"] for line in skipped} == {"batch_cancelled"}
    assert UsageRecord.objects.filter(organization=tenant.organization).count() == counts.completed
    again = httpx.post(f"{gateway_url}/v1/batches/{batch.id}/cancel", headers={"authorization": f"Bearer {tenant.raw_key}"})
    assert again.status_code == 200 and again.json()["status"] == "cancelled"

    second = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    client.batches.cancel(second.id)
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id] and page.has_more
    validate_response("/v1/batches", "get", 200, page.model_dump(exclude_unset=True))
    assert [b.id for b in client.batches.list(limit=1, after=second.id).data] == [batch.id]
    wait_for_status(client, second.id, {"cancelled"})


def test_a_batch_past_its_window_expires_with_the_unrun_lines_in_the_error_file(gateway_url, smollm2):
    tenant = make_tenant("batch-expire")
    client = client_for(gateway_url, tenant)
    lines = slow_lines("x", count=100)
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    wait_for_status(client, batch.id, {"in_progress"})
    Batch.objects.filter(batch_id=batch.id).update(expires_at=timezone.now())  # its 24 hours are over
    done = wait_for_status(client, batch.id, {"expired"})  # seen within a second, long before the 100th line
    assert done.expired_at and done.request_counts.completed < 100
    validate_response("/v1/batches/{batch_id}", "get", 200, done.model_dump(exclude_unset=True))
    unrun = [line for line in output_lines(client, done.error_file_id) if line["error"]]
    assert unrun and {line["error"]["code"] for line in unrun} == {"batch_expired"}
    assert len(unrun) + done.request_counts.completed == 100
    assert len(output_lines(client, done.output_file_id)) == done.request_counts.completed
    assert UsageRecord.objects.filter(organization=tenant.organization).count() == done.request_counts.completed


def test_200_lines_survive_a_worker_killed_midway_each_answered_and_billed_once(batch_env, smollm2):
    url, state = batch_env
    tenant = make_tenant("batch-kill")
    client = client_for(url, tenant)
    lines = [{"custom_id": f"k-{i:03d}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "smollm2", "prompt": f"{i} +", "max_tokens": 1, "temperature": 0}} for i in range(200)]
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    started = time.monotonic()
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + WAIT
    while BatchLine.objects.filter(batch__batch_id=batch.id).exclude(state="pending").count() < 60:
        assert time.monotonic() < deadline, "the batch did not progress"
        time.sleep(0.05)
    state["worker"].kill()
    at_kill = BatchLine.objects.filter(batch__batch_id=batch.id).exclude(state="pending").count()
    in_flight = Reservation.objects.filter(organization=tenant.organization).count()
    state["worker"] = Worker(state["dir"] / "files", state["dir"] / "worker.log")
    done = wait_for_status(client, batch.id, {"completed", "failed"})
    elapsed = time.monotonic() - started
    print(f"200-line batch: {elapsed:.1f}s with a SIGKILL after {at_kill} lines ({in_flight} holds in flight)")
    assert done.status == "completed" and done.request_counts.completed == 200 and done.request_counts.failed == 0
    answered = output_lines(client, done.output_file_id)
    assert len(answered) == 200 and len({line["custom_id"] for line in answered}) == 200
    assert {line["custom_id"] for line in answered} == {line["custom_id"] for line in lines}
    records = UsageRecord.objects.filter(organization=tenant.organization)
    assert records.count() == 200
    assert {r.request_id for r in records} == {line["response"]["request_id"] for line in answered}
    entitlement = Entitlement.objects.get(pk=tenant.entitlement.pk)
    assert entitlement.tokens_used == sum(r.total_tokens for r in records)
    assert entitlement.tokens_reserved == 0 and not Reservation.objects.filter(organization=tenant.organization).exists()
