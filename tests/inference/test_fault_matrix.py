"""The fault matrix (issue 14): against real processes (the gateway under uvicorn, `python -m engine
serve` on SmolLM2, the real PostgreSQL, a private `redis-server` this module can stop), each fault is
injected and then the ledger is checked for the tenant that suffered it: `tokens_used` is the sum of its
usage records, `tokens_reserved` the sum of its live reservations (none once its requests ended, or
after the expiry sweep), and a request that reached the engine has exactly one usage record, with
tokens when the engine did work.

Faults: the client leaves before the first byte, during prefill, mid-stream and just before the last
chunk; the engine is killed (-9) mid-stream; the gateway's PostgreSQL connections are terminated
(pg_terminate_backend, the stand-in for a restart: the machine's server is shared) during a burst;
Redis is stopped mid-stream."""

from __future__ import annotations

import datetime as dt
import json
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
from django.db import connection
from django.utils import timezone

from accounts.models import Entitlement
from inference import quotas
from inference.models import Reservation, UsageRecord
from tests.processes import free_port, start_engine, stop

from .conftest import add_model, make_tenant, start_gateway

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

LONG_PROMPT = "Describe the weather in every city you know. " * 60  # ~550 tokens: a prefill of a while


@dataclass
class Redis:
    port: int
    process: subprocess.Popen


@pytest.fixture(scope="module")
def redis():
    port = free_port()
    server = Redis(port, start_redis(port))
    yield server
    stop(server.process)


def start_redis(port: int) -> subprocess.Popen:
    process = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("redis-server did not start")


@pytest.fixture(scope="module")
def private_gateway(django_db_setup, redis):
    """A gateway on this module's Redis (which one test stops)."""
    url, process = start_gateway(REDIS_URL=f"redis://127.0.0.1:{redis.port}/0", GATEWAY_REDIS_TIMEOUT="0.3")
    yield url
    stop(process)


@pytest.fixture
def tenant(engine_server):
    """A tenant of the suite's engine (the session's `python -m engine serve` on SmolLM2)."""
    add_model("smollm2", engine_server, context_length=2048)
    return make_tenant(token_quota=1_000_000)


def headers(tenant) -> dict:
    return {"authorization": f"Bearer {tenant.raw_key}"}


def body(content: str = "Count from one to fifty.", max_tokens: int = 40, stream: bool = True) -> dict:
    return {"model": "smollm2", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream, "ignore_eos": True, "temperature": 0}


def content_chunks(lines, stop_after: int | None = None):
    """The stream's chunks with generated text, as they arrive (stops reading after `stop_after`)."""
    seen = 0
    for line in lines:
        if not line.startswith("data: {"):
            continue
        chunk = json.loads(line[6:])
        if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or ()):
            seen += 1
            yield chunk
            if stop_after is not None and seen >= stop_after:
                return


def ledger(tenant, settle_within: float = 15) -> list[UsageRecord]:
    """The tenant's usage records once its requests have settled; asserts the ledger invariant."""
    entitlement = tenant.entitlement
    deadline = time.monotonic() + settle_within
    while Reservation.objects.filter(entitlement=entitlement).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    entitlement = Entitlement.objects.get(pk=entitlement.pk)
    records = list(UsageRecord.objects.filter(entitlement=entitlement))
    live = sum(r.tokens for r in Reservation.objects.filter(entitlement=entitlement))
    assert entitlement.tokens_used == sum(r.prompt_tokens + r.completion_tokens for r in records), records
    assert entitlement.tokens_reserved == live == 0
    return records


def test_a_client_that_leaves_before_the_first_byte(gateway, tenant):
    host, port = gateway.removeprefix("http://").split(":")
    payload = json.dumps(body()).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     + f"authorization: Bearer {tenant.raw_key}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
                     + payload)
    time.sleep(1.5)  # whatever the gateway got to do
    records = ledger(tenant)
    assert len(records) <= 1
    if records:  # it reached the engine: its prompt is billed
        assert records[0].status == "client_disconnected" and records[0].prompt_tokens > 0


def test_a_client_that_leaves_during_prefill_is_billed_the_prompt(gateway, tenant):
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body(LONG_PROMPT), headers=headers(tenant),
                      timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert not chunk["choices"][0]["delta"].get("content")  # the role chunk: prefill under way
                break
    [record] = ledger(tenant)
    assert record.status == "client_disconnected" and record.prompt_tokens > 400


def cut_after(gateway, tenant, chunks: int) -> list[dict]:
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body(max_tokens=16), headers=headers(tenant),
                      timeout=60) as response:
        return list(content_chunks(response.iter_lines(), stop_after=chunks))


def test_a_client_that_leaves_mid_stream_is_billed_what_was_generated(gateway, tenant):
    assert len(cut_after(gateway, tenant, 3)) == 3
    [record] = ledger(tenant)
    assert record.status == "client_disconnected" and record.prompt_tokens > 0 and 3 <= record.completion_tokens <= 16


def test_a_client_that_leaves_just_before_the_last_chunk_is_billed_what_was_generated(gateway, tenant):
    whole = cut_after(gateway, tenant, 10**6)  # the same greedy answer, read to its end: its chunks
    assert len(cut_after(gateway, tenant, len(whole) - 1)) == len(whole) - 1
    done, cut = sorted(ledger(tenant), key=lambda r: r.status != "ok")
    assert (done.status, cut.status) == ("ok", "client_disconnected") and done.completion_tokens == 16
    assert cut.prompt_tokens == done.prompt_tokens and len(whole) - 1 <= cut.completion_tokens <= 16


def test_pg_connections_terminated_during_a_burst(gateway, tenant):
    answers: list[httpx.Response | Exception] = []

    def call():
        try:
            answers.append(httpx.post(f"{gateway}/v1/chat/completions", json=body(max_tokens=6, stream=False),
                                      headers=headers(tenant), timeout=60))
        except httpx.HTTPError as exc:
            answers.append(exc)

    threads = [threading.Thread(target=call) for _ in range(12)]
    for t in threads:
        t.start()
    terminated = 0
    for _ in range(3):
        time.sleep(0.4)
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND pid <> pg_backend_pid()")
            terminated += cursor.fetchone()[0]
    for t in threads:
        t.join()
    assert terminated > 0
    ok = [a for a in answers if isinstance(a, httpx.Response) and a.status_code == 200]
    assert ok and all(isinstance(a, httpx.Response) and a.status_code in (200, 503) for a in answers), answers
    # A hold whose answer was lost with its connection is left to the sweep: run it as if its TTL passed.
    quotas.expire_reservations(timezone.now() + dt.timedelta(hours=1))
    records = {r.request_id: r for r in ledger(tenant)}
    for answer in ok:  # every answered request is billed, once
        record = records[answer.headers["x-request-id"]]
        assert record.completion_tokens == answer.json()["usage"]["completion_tokens"] > 0


def test_redis_stopped_mid_stream(private_gateway, tenant, redis):
    gateway = private_gateway
    try:
        with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body(max_tokens=12), headers=headers(tenant),
                          timeout=60) as response:
            chunks = content_chunks(response.iter_lines())
            next(chunks)
            redis.process.send_signal(signal.SIGKILL)
            rest = list(chunks)
        assert 1 + len(rest) >= 8  # the stream went on without Redis
        refused = httpx.post(f"{gateway}/v1/chat/completions", json=body(stream=False), headers=headers(tenant),
                             timeout=30)
        assert refused.status_code == 503  # GATEWAY_RATELIMIT_ON_REDIS_ERROR=refuse: no limiter, no admission
        [record] = ledger(tenant)
        assert record.status == "ok" and record.completion_tokens == 12
    finally:
        redis.process.wait()
        redis.process = start_redis(redis.port)


def test_the_engine_killed_mid_stream(gateway):
    """A private engine (this test kills it): the stream ends in an error event and the work the engine
    did is billed, counted by the gateway with the tokenizer the engine had published."""
    from engine.loader import demo_model_path

    process, url = start_engine(demo_model_path(), "--served-model-name", "doomed", "--threads", "1",
                                "--max-model-len", "512", "--log-level", "warning")
    try:
        add_model("doomed", url, context_length=512)
        tenant = make_tenant(token_quota=1_000_000)
        with httpx.stream("POST", f"{gateway}/v1/chat/completions", json={**body(max_tokens=100), "model": "doomed"},
                          headers=headers(tenant), timeout=60) as response:
            lines = response.iter_lines()
            got = list(content_chunks(lines, stop_after=3))
            process.send_signal(signal.SIGKILL)
            tail = list(lines)
    finally:
        stop(process)
    assert len(got) == 3 and any('"upstream_error"' in line for line in tail)
    [record] = ledger(tenant)
    assert record.status == "upstream_error" and record.prompt_tokens > 0 and record.completion_tokens >= 3
