"""Every Celery task run by a REAL worker process (`celery -A maas worker`) against the machine's Redis,
on a queue of its own, reading and writing the test database; effects are checked in the database
and in the mail the worker delivered (file email backend)."""

from __future__ import annotations

import datetime as dt
import http.server
import os
import subprocess
import sys
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import redis
from celery import Celery
from django.db import connection
from django.utils import timezone

from accounts.models import Entitlement
from inference.models import DailyUsage, Deployment, EntitlementNotice, Reservation, UsageRecord, UsageStatus
from maas.mail import serialize_message
from tests.inference.conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
BROKER = "redis://127.0.0.1:6379/4"  # OPS's Redis database
QUEUE = f"ops-test-{uuid.uuid4().hex[:8]}"
WAIT = 60.0


def database_url(**query: str) -> str:
    s = connection.settings_dict
    url = f"postgres://{s.get('USER') or 'postgres'}@{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


def process_env(mail_dir: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        # Locks held longer than 1 s make a task fail with a DatabaseError (the retry test uses it).
        "DATABASE_URL": database_url(options="-c%20lock_timeout%3D1000"),
        "REDIS_URL": BROKER,
        "CELERY_BROKER_URL": BROKER,
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "CELERY_TASK_DEFAULT_QUEUE": QUEUE,
        "EMAIL_BACKEND": "django.core.mail.backends.filebased.EmailBackend",
        "EMAIL_FILE_PATH": str(mail_dir),
        "LOG_FORMAT": "text",
    }
    env.pop("TEST_DATABASE_NAME", None)
    return env


class Worker:
    def __init__(self, mail_dir: Path, log_path: Path, queue: str = QUEUE, **extra_env: str) -> None:
        self.mail_dir, self.log_path = mail_dir, log_path
        env = {**process_env(mail_dir), "CELERY_TASK_DEFAULT_QUEUE": queue, **extra_env}
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "maas", "worker", "-Q", queue, "--pool", "solo",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--hostname", f"{queue}@%h"],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for(lambda: "ready." in self.output(), "worker ready", check=self.process)

    def output(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def wait_for(condition, what: str, timeout: float = WAIT, check: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        if check is not None and check.poll() is not None:
            raise RuntimeError(f"worker exited with {check.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def worker(django_db_setup, django_db_blocker, tmp_path_factory):
    directory = tmp_path_factory.mktemp("celery")
    (directory / "mail").mkdir()
    with django_db_blocker.unblock():
        process = Worker(directory / "mail", directory / "worker.log")
    yield process
    process.stop()
    client = redis.Redis.from_url(BROKER)
    client.delete(QUEUE)
    client.close()


@pytest.fixture(scope="module")
def producer():
    app = Celery("ops-test-producer", broker=BROKER, set_as_current=False)
    app.conf.task_default_queue = QUEUE
    yield app
    app.close()


def run(producer: Celery, name: str, *args, **kwargs) -> None:
    producer.send_task(name, args=args, kwargs=kwargs, queue=QUEUE)


def delivered(worker: Worker) -> list[str]:
    """Messages the worker's file email backend wrote, one string each."""
    messages = []
    for path in sorted(worker.mail_dir.glob("*.log")):
        messages += [m for m in path.read_text().split("-" * 79) if m.strip()]
    return messages


def sentinel(worker: Worker, producer: Celery) -> None:
    """Send a marker mail and wait for it: the solo worker has then finished every task queued before."""
    from django.core.mail import EmailMessage

    marker = f"sentinel-{uuid.uuid4().hex}"
    run(producer, "accounts.tasks.send_email", serialize_message(EmailMessage(marker, "-", "a@example.com", ["b@example.com"])), marker)
    wait_for(lambda: any(marker in m for m in delivered(worker)), "sentinel mail")


def test_send_email_delivers_once_per_idempotency_key(worker, producer):
    from django.core.mail import EmailMultiAlternatives

    subject = f"Verify your address {uuid.uuid4().hex[:6]}"
    message = EmailMultiAlternatives(subject, "plain body", "noreply@example.com", ["user@example.com"])
    message.attach_alternative("<p>html body</p>", "text/html")
    payload, key = serialize_message(message), f"key-{uuid.uuid4().hex}"
    run(producer, "accounts.tasks.send_email", payload, key)
    run(producer, "accounts.tasks.send_email", payload, key)  # a redelivery
    sentinel(worker, producer)
    mails = [m for m in delivered(worker) if subject in m]
    assert len(mails) == 1
    assert "To: user@example.com" in mails[0] and "<p>html body</p>" in mails[0]


def test_daily_rollup_per_organization_model_and_key(worker, producer):
    tenant = make_tenant("rollup")
    other_key, _ = type(tenant.api_key).objects.create_key(tenant.organization, "second key")
    today = timezone.now().astimezone(dt.UTC).date()

    def record(key, model, prompt, completion, status=UsageStatus.OK, cost="0.5"):
        return UsageRecord.objects.create(
            organization=tenant.organization, api_key=key, model_name=model, endpoint="chat/completions",
            prompt_tokens=prompt, cached_tokens=prompt // 2, completion_tokens=completion, cost=Decimal(cost),
            status=status, http_status=200, latency_ms=10, request_id=f"req_{uuid.uuid4().hex}",
        )

    record(tenant.api_key, "m1", 100, 10)
    record(tenant.api_key, "m1", 50, 5, status=UsageStatus.UPSTREAM_ERROR)
    record(other_key, "m1", 7, 3)
    record(tenant.api_key, "m2", 20, 2)
    old = record(tenant.api_key, "m1", 999, 999)
    UsageRecord.objects.filter(pk=old.pk).update(created_at=timezone.now() - dt.timedelta(days=3))

    run(producer, "inference.tasks.rollup_daily_usage", today.isoformat())
    rows = wait_for(lambda: list(DailyUsage.objects.filter(day=today).order_by("model_name", "requests")), "rollup rows")
    summary = {(r.model_name, r.api_key_id): (r.requests, r.failed_requests, r.prompt_tokens, r.cached_tokens, r.completion_tokens, r.cost) for r in rows}
    assert summary == {
        ("m1", tenant.api_key.pk): (2, 1, 150, 75, 15, Decimal("1.00000000")),
        ("m1", other_key.pk): (1, 0, 7, 3, 3, Decimal("0.50000000")),
        ("m2", tenant.api_key.pk): (1, 0, 20, 10, 2, Decimal("0.50000000")),
    }
    first_ids = {r.pk for r in rows}

    # Idempotent: the same day rolled up again gives the same numbers (rows rebuilt, not added to).
    record(tenant.api_key, "m2", 1, 1)
    run(producer, "inference.tasks.rollup_daily_usage", today.isoformat())
    wait_for(lambda: not DailyUsage.objects.filter(pk__in=first_ids).exists(), "second rollup")
    m2 = DailyUsage.objects.get(day=today, model_name="m2")
    assert (m2.requests, m2.prompt_tokens) == (2, 21)
    assert DailyUsage.objects.filter(day=today).count() == 3
    totals = DailyUsage.objects.for_org(tenant.organization).filter(day=today).totals()
    assert totals["requests"] == 5 and totals["completion_tokens"] == 21


def test_rollup_is_retried_with_backoff_while_the_database_refuses(worker, producer):
    """A lock held by another session makes the first attempts fail (lock_timeout 1 s); the task is
    retried by the worker and succeeds once the lock is gone."""
    tenant = make_tenant("retry")
    UsageRecord.objects.create(
        organization=tenant.organization, api_key=tenant.api_key, model_name="m-retry", endpoint="completions",
        prompt_tokens=3, completion_tokens=4, status=UsageStatus.OK, http_status=200, latency_ms=1,
        request_id=f"req_{uuid.uuid4().hex}",
    )
    day = timezone.now().astimezone(dt.UTC).date()
    with psycopg.connect(database_url(), autocommit=False) as blocker:
        blocker.execute("LOCK TABLE inference_dailyusage IN ACCESS EXCLUSIVE MODE")
        run(producer, "inference.tasks.rollup_daily_usage", day.isoformat())
        wait_for(lambda: "Retry in" in worker.output(), "a retry scheduled by the worker")
        blocker.rollback()
    row = wait_for(lambda: DailyUsage.objects.filter(day=day, model_name="m-retry").first(), "rollup after retry")
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 3, 4)
    assert "LockNotAvailable" in worker.output() or "lock timeout" in worker.output()


def test_expired_reservations_are_released(worker, producer):
    tenant = make_tenant("crashed", token_quota=10_000)
    entitlement = tenant.entitlement
    Entitlement.objects.filter(pk=entitlement.pk).update(tokens_reserved=700)
    stale = Reservation.objects.create(
        organization=tenant.organization, entitlement=entitlement, tokens=500, request_id="req_stale",
        expires_at=timezone.now() - dt.timedelta(minutes=1),
    )
    live = Reservation.objects.create(
        organization=tenant.organization, entitlement=entitlement, tokens=200, request_id="req_live",
        expires_at=timezone.now() + dt.timedelta(minutes=10),
    )
    run(producer, "inference.tasks.expire_reservations")
    wait_for(lambda: not Reservation.objects.filter(pk=stale.pk).exists(), "stale reservation released")
    assert Reservation.objects.filter(pk=live.pk).exists()
    assert Entitlement.objects.get(pk=entitlement.pk).tokens_reserved == 200
    run(producer, "inference.tasks.expire_reservations")  # nothing left to release: no change
    sentinel(worker, producer)
    assert Entitlement.objects.get(pk=entitlement.pk).tokens_reserved == 200


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_deployment_health_checks_store_the_result(worker, producer):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        up = add_model("up-model", f"http://127.0.0.1:{server.server_port}")
        down = add_model("down-model", "http://127.0.0.1:9")
        Deployment.objects.filter(model=up).update(healthy=False)
        run(producer, "inference.tasks.check_deployments")
        wait_for(lambda: Deployment.objects.filter(model=down, healthy=False).exists(), "down marked unhealthy")
        wait_for(lambda: Deployment.objects.filter(model=up, healthy=True).exists(), "up marked healthy")
        down_row = Deployment.objects.get(model=down)
        assert down_row.last_error and down_row.last_checked_at is not None
    finally:
        server.shutdown()
        server.server_close()


def test_entitlement_threshold_notices_are_sent_once(worker, producer):
    tenant = make_tenant("nearly", token_quota=1000)
    Entitlement.objects.filter(pk=tenant.entitlement.pk).update(
        tokens_used=960, ends_at=timezone.now() + dt.timedelta(days=3)
    )
    run(producer, "inference.tasks.notify_entitlement_thresholds")
    wait_for(lambda: EntitlementNotice.objects.filter(entitlement=tenant.entitlement).count() == 3, "notices")
    assert set(EntitlementNotice.objects.filter(entitlement=tenant.entitlement).values_list("threshold", flat=True)) == {
        "quota-80", "quota-95", "ends-7d"
    }
    # The email goes through the queue too (CeleryEmailBackend in the worker → send_email task).
    wait_for(lambda: [m for m in delivered(worker) if tenant.user.email in m], "notice email")

    run(producer, "inference.tasks.notify_entitlement_thresholds")  # nothing new crossed
    sentinel(worker, producer)
    mails = [m for m in delivered(worker) if tenant.user.email in m]
    assert len(mails) == 1
    assert "Token quota running low" in mails[0] and "960 of 1,000 tokens used" in mails[0]

    Entitlement.objects.filter(pk=tenant.entitlement.pk).update(tokens_used=1000)
    run(producer, "inference.tasks.notify_entitlement_thresholds")
    wait_for(lambda: len([m for m in delivered(worker) if tenant.user.email in m]) == 2, "quota exhausted email")
    assert EntitlementNotice.objects.filter(entitlement=tenant.entitlement, threshold="quota-100").count() == 1
    assert any("Token quota exhausted" in m for m in delivered(worker))


def test_beat_schedules_the_periodic_tasks_onto_the_worker(worker, tmp_path):
    """A real `celery -A maas beat` with the settings' schedule (health checks every second here)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    add_model("beat-model", f"http://127.0.0.1:{server.server_port}")
    env = {**process_env(worker.mail_dir), "DEPLOYMENT_HEALTH_CHECK_SECONDS": "1"}
    log = open(tmp_path / "beat.log", "w")  # noqa: SIM115
    beat = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "maas", "beat", "--loglevel", "INFO",
         "--schedule", str(tmp_path / "celerybeat-schedule")],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        checks = wait_for(
            lambda: Deployment.objects.filter(model__name="beat-model", last_checked_at__isnull=False).first(),
            "a health check scheduled by beat", check=beat,
        )
        first = checks.last_checked_at
        wait_for(lambda: Deployment.objects.get(pk=checks.pk).last_checked_at > first, "the next check", check=beat)
        assert "Sending due task check-deployments" in (tmp_path / "beat.log").read_text()
    finally:
        beat.terminate()
        beat.wait(timeout=20)
        log.close()
        server.shutdown()
        server.server_close()
