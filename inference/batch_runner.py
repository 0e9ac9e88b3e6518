"""The Batch API's runner, on a Celery worker of the batch queue: validate the input file into one
row per line, run the lines through the gateway's admission and metering, write the output and error
files.

Exactly once per line, whatever is killed when:
- one runner per batch at a time: a lease on the batch row (`lease_owner`, `lease_until`), renewed by a
  thread while the runner lives; a runner whose lease lapsed is stopped by the checks below;
- a line's settlement (quota charge, usage record), its result and the batch's counters commit in ONE
  transaction, conditional on the line still being pending and the lease still being this runner's:
  a line is billed and answered together or neither;
- a line's usage record carries the line's own request id (unique), so even a second settlement of the
  same line would fail rather than bill twice;
- a line started by a runner that died keeps its hold (a Reservation with the line's request id) until
  the next runner releases it before running the line again.
A restarted worker resumes the batches it held (`resume`, run at worker start and by Celery beat) once
their lease has lapsed.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import httpx
from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from . import files, prompt_count, proxy, quotas, responses
from .batch_models import ACTIVE_STATUSES, Batch, BatchLine, BatchStatus, LineState
from .catalog import catalog
from .errors import GatewayError, error_body
from .models import Reservation, UsageRecord, UsageStatus
from .ratelimit import get_limiter
from .validation import parse_chat, parse_completion, parse_embedding

logger = logging.getLogger(__name__)

PARSERS = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion, "/v1/embeddings": parse_embedding}
LINE_FIELDS = {"custom_id", "method", "url", "body"}
MAX_ERRORS = 100
# Refusals a line waits out (the batch yields to interactive traffic) instead of failing.
RETRYABLE_CODES = {"rate_limit_exceeded", "quota_in_flight", "service_unavailable"}
MAX_ATTEMPTS = 5  # of a line whose replica could not be reached


class LeaseLost(Exception):
    """Another runner holds the batch now: this one stops without committing the line in hand."""


# -- the task's entry points ----------------------------------------------------------------------------
def run(batch_pk: int) -> str:
    """Take the batch's lease and move it as far as it goes; "busy" when another runner holds it."""
    owner = uuid.uuid4().hex
    if not take_lease(batch_pk, owner):
        return "busy"
    renewer = LeaseRenewer(batch_pk, owner)
    renewer.start()
    try:
        batch = Batch.objects.select_related("input_file").get(pk=batch_pk)
        if batch.status == BatchStatus.VALIDATING:
            validate(batch, owner)
        if batch.status == BatchStatus.IN_PROGRESS:
            run_lines(batch, owner, renewer)
        if batch.status in (BatchStatus.FINALIZING, BatchStatus.CANCELLING):
            finalize(batch, owner)
        return batch.status
    except LeaseLost:
        logger.warning("batch %s: lease lost, another runner continues", batch_pk)
        return "lease_lost"
    finally:
        renewer.stop()
        Batch.objects.filter(pk=batch_pk, lease_owner=owner).update(lease_owner="", lease_until=None)


def resume() -> int:
    """Queue a runner for every unfinished batch (after its lease lapses, when held): the batches of a
    worker that died are taken up again. Returns how many were queued."""
    from .batches import queue

    now = timezone.now()
    queued = 0
    for pk, lease_until in Batch.objects.filter(status__in=ACTIVE_STATUSES).values_list("pk", "lease_until"):
        wait = 0.0 if lease_until is None or lease_until <= now else (lease_until - now).total_seconds() + 0.5
        queue(pk, countdown=wait or None)
        queued += 1
    return queued


# -- the lease ----------------------------------------------------------------------------------------------
def take_lease(batch_pk: int, owner: str) -> bool:
    now = timezone.now()
    return Batch.objects.filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now), pk=batch_pk,
                                status__in=ACTIVE_STATUSES).update(
        lease_owner=owner, lease_until=now + timedelta(seconds=settings.BATCH_LEASE_SECONDS)) == 1


class LeaseRenewer(threading.Thread):
    """Renews the lease every third of BATCH_LEASE_SECONDS; `lost` is set when it could not."""

    def __init__(self, batch_pk: int, owner: str):
        super().__init__(daemon=True, name=f"batch-lease-{batch_pk}")
        self.batch_pk, self.owner = batch_pk, owner
        self.done, self.lost = threading.Event(), threading.Event()

    def run(self) -> None:
        try:
            while not self.done.wait(settings.BATCH_LEASE_SECONDS / 3):
                until = timezone.now() + timedelta(seconds=settings.BATCH_LEASE_SECONDS)
                try:
                    if not Batch.objects.filter(pk=self.batch_pk, lease_owner=self.owner).update(lease_until=until):
                        self.lost.set()
                        return
                except DatabaseError:
                    logger.warning("batch %s: could not renew the lease", self.batch_pk, exc_info=True)
        finally:
            connection.close()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def guard(batch: Batch, owner: str, **changes) -> None:
    """Update the batch only while this runner holds it (LeaseLost otherwise)."""
    if not Batch.objects.filter(pk=batch.pk, lease_owner=owner).update(**changes):
        raise LeaseLost
    for name, value in changes.items():
        if not hasattr(value, "resolve_expression"):
            setattr(batch, name, value)


# -- validating → in_progress | failed ---------------------------------------------------------------
def batch_error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict:
    return {"code": code, "message": message, "param": param, "line": line}


def parse_input(batch: Batch, data: bytes) -> tuple[list[BatchLine], list[dict], str | None]:
    """The input file's lines, the errors that fail the batch (OpenAI's BatchError objects), and the model."""
    lines, errors, seen, model = [], [], set(), None
    raw_lines = [(n, raw) for n, raw in enumerate(data.split(b"\n"), 1) if raw.strip()]
    if not raw_lines:
        return [], [batch_error("empty_file", "The input file has no requests.")], None
    if len(raw_lines) > settings.BATCH_MAX_LINES:
        return [], [batch_error("too_many_requests", f"The input file has {len(raw_lines)} requests; the limit is"
                                f" {settings.BATCH_MAX_LINES} (BATCH_MAX_LINES).")], None
    for number, raw in raw_lines:
        if len(errors) >= MAX_ERRORS:
            break
        try:
            item = json.loads(raw)
        except ValueError:
            errors.append(batch_error("invalid_json_line", "This line is not valid JSON.", number))
            continue
        if not isinstance(item, dict):
            errors.append(batch_error("invalid_json_line", "This line is not a JSON object.", number))
            continue
        unknown = sorted(set(item) - LINE_FIELDS)
        custom_id, body = item.get("custom_id"), item.get("body")
        if unknown:
            errors.append(batch_error("invalid_request", f"Unrecognized field '{unknown[0]}'.", number, unknown[0]))
        elif not isinstance(custom_id, str) or not custom_id or len(custom_id) > 512:
            errors.append(batch_error("missing_custom_id", "'custom_id' must be a non-empty string of up to 512"
                                      " characters.", number, "custom_id"))
        elif custom_id in seen:
            errors.append(batch_error("duplicate_custom_id", f"The custom_id '{custom_id}' is used by an earlier line.",
                                      number, "custom_id"))
        elif item.get("method") != "POST":
            errors.append(batch_error("invalid_method", "'method' must be 'POST'.", number, "method"))
        elif item.get("url") != batch.endpoint:
            errors.append(batch_error("invalid_url", f"'url' must be the batch's endpoint, '{batch.endpoint}'.", number, "url"))
        elif not isinstance(body, dict) or not isinstance(body.get("model"), str):
            errors.append(batch_error("invalid_request", "'body' must be a JSON object with a 'model'.", number, "body"))
        elif model is not None and body["model"] != model:
            errors.append(batch_error("mismatched_model", f"Every line of a batch must use the same model: this line"
                                      f" uses '{body['model']}', an earlier one '{model}'.", number, "body.model"))
        else:
            seen.add(custom_id)
            model = body["model"]
            lines.append(BatchLine(batch=batch, line=number, custom_id=custom_id, body=body,
                                   request_id=f"batch_req_{secrets.token_hex(16)}"))
    return lines, errors, model


def check_model(batch: Batch, model: str) -> list[dict]:
    """The key may use the model, and the model serves the batch's endpoint."""
    try:
        caller = quotas.admit_key(quotas.KeyCredential(batch.api_key_id or 0))
        entry, _ = caller.resolve(model)
    except GatewayError as exc:
        return [batch_error(exc.code or "invalid_request", exc.message, None, "body.model")]
    refusal = entry.model.endpoint_refusal(batch.endpoint.removeprefix("/v1/").replace("responses", "chat/completions"))
    return [batch_error("model_not_supported", refusal, None, "body.model")] if refusal else []


def validate(batch: Batch, owner: str) -> None:
    if batch.input_file is None:
        lines, errors, model = [], [batch_error("file_not_found", f"The input file {batch.input_file_name} was deleted.")], None
    else:
        lines, errors, model = parse_input(batch, files.read(batch.input_file))
    if not errors:
        errors = check_model(batch, model)
    now = timezone.now()
    with transaction.atomic():
        status = Batch.objects.select_for_update().values_list("status", flat=True).get(pk=batch.pk)
        if status == BatchStatus.CANCELLING:  # cancelled while validating: nothing ran
            batch.status = status
            return
        if errors:
            guard(batch, owner, status=BatchStatus.FAILED, failed_at=now, errors={"object": "list", "data": errors},
                  model_name=model or "")
            return
        BatchLine.objects.bulk_create(lines)
        guard(batch, owner, status=BatchStatus.IN_PROGRESS, in_progress_at=now, total=len(lines), model_name=model)


# -- in_progress: the lines ---------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one attempt of a line ends with: its file line, and (when it reached admission) the hold to
    settle and the usage record to write."""

    state: str
    result: dict
    admission: quotas.Admission | None = None
    record: UsageRecord | None = None
    used: int = 0
    stored: dict | None = field(default=None)  # a /v1/responses line's body, stored unless store is false
    parsed: responses.ResponsesRequest | None = None
    history: list = field(default_factory=list)


class Retry(Exception):
    def __init__(self, seconds: float):
        super().__init__(seconds)
        self.seconds = seconds


def run_lines(batch: Batch, owner: str, renewer: LeaseRenewer) -> None:
    """Run the pending lines, BATCH_LINE_CONCURRENCY at a time, until none is left or the batch is
    cancelled, expires or is taken over; then on to finalizing (or the end state's finalize)."""
    pending = iter(list(batch.lines.filter(state=LineState.PENDING).order_by("line").values_list("pk", flat=True)))
    lock, stop = threading.Lock(), threading.Event()
    client = httpx.Client(timeout=httpx.Timeout(connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
                                                read=settings.GATEWAY_UPSTREAM_READ_TIMEOUT,
                                                write=settings.GATEWAY_UPSTREAM_WRITE_TIMEOUT,
                                                pool=settings.GATEWAY_UPSTREAM_POOL_TIMEOUT))
    failures: list[BaseException] = []

    def work() -> None:
        try:
            while not stop.is_set():
                with lock:
                    line_pk = next(pending, None)
                if line_pk is None:
                    return
                run_line(batch, owner, line_pk, client, stop)
        except BaseException as exc:  # noqa: BLE001 - the main thread re-raises it
            failures.append(exc)
            stop.set()
        finally:
            connection.close()

    threads = [threading.Thread(target=work, daemon=True) for _ in range(max(1, settings.BATCH_LINE_CONCURRENCY))]
    for thread in threads:
        thread.start()
    while alive := [thread for thread in threads if thread.is_alive()]:
        alive[0].join(timeout=1.0)  # a cancel, the expiry or a lost lease is seen within a second
        status, expires_at = Batch.objects.values_list("status", "expires_at").get(pk=batch.pk)
        if status != BatchStatus.IN_PROGRESS or expires_at <= timezone.now() or renewer.lost.is_set():
            stop.set()
    client.close()
    if failures:
        raise failures[0]
    if renewer.lost.is_set():
        raise LeaseLost
    batch.refresh_from_db()
    if batch.status == BatchStatus.IN_PROGRESS:
        guard(batch, owner, status=BatchStatus.FINALIZING, finalizing_at=timezone.now())


def run_line(batch: Batch, owner: str, line_pk: int, client: httpx.Client, stop: threading.Event) -> None:
    line = BatchLine.objects.get(pk=line_pk)
    if line.state != LineState.PENDING:
        return
    release_leftover_holds(line.request_id)
    while not stop.is_set():
        BatchLine.objects.filter(pk=line.pk).update(attempts=F("attempts") + 1)
        line.attempts += 1
        try:
            outcome = attempt(batch, line, client)
        except Retry as retry:
            stop.wait(retry.seconds)
            continue
        commit(batch, owner, line, outcome)
        return


def release_leftover_holds(request_id: str) -> None:
    """The holds an earlier, killed attempt of this line left (never settled: settling commits with the
    line's result): expired now and released by the one sweep that releases crashed requests' holds."""
    if Reservation.objects.filter(request_id=request_id).update(expires_at=timezone.now()):
        quotas.expire_reservations()


def result_line(line: BatchLine, status_code: int, body: dict) -> dict:
    return {"id": line.request_id, "custom_id": line.custom_id,
            "response": {"status_code": status_code, "request_id": line.request_id, "body": body}, "error": None}


def refused(line: BatchLine, exc: GatewayError) -> Outcome:
    return Outcome(LineState.FAILED, result_line(line, exc.status, error_body(exc.message, exc.type, exc.code, exc.param)))


def attempt(batch: Batch, line: BatchLine, client: httpx.Client) -> Outcome:
    """One try of a line: parse (400), admit as the batch's key (the gateway's checks, rate limits and
    token hold), forward, meter. Raises Retry for what is worth waiting for."""
    parsed, history = None, []
    try:
        if batch.endpoint == "/v1/responses":
            parsed = responses.parse(line.body)
            if parsed.stream:
                raise GatewayError(400, "'stream' is not supported in a batch.", code="invalid_value", param="stream")
            history = responses.history_of(batch.organization_id, parsed.previous_response_id)
            inference = responses.chat_request(parsed, history)
        else:
            inference = PARSERS[batch.endpoint](line.body)
            if inference.stream:
                raise GatewayError(400, "'stream' is not supported in a batch.", code="invalid_value", param="stream")
        admission = quotas.admit_request(quotas.KeyCredential(batch.api_key_id or 0), inference, None, line.request_id,
                                         get_limiter())
    except GatewayError as exc:
        if exc.code in RETRYABLE_CODES:
            raise Retry(min(5.0, float(exc.headers.get("retry-after", 1)))) from None
        return refused(line, exc)
    meter = proxy.Meter()
    status_code, body = forward(admission, inference, meter, client, line.request_id)
    if status_code is None:  # the replica could not be reached: nothing was done, nothing is billed
        quotas.settle(admission.hold, 0, None)
        get_limiter().release(admission.decision, 0)
        if line.attempts < MAX_ATTEMPTS:
            raise Retry(min(5.0, 0.5 * 2 ** line.attempts))
        return Outcome(LineState.FAILED, result_line(line, 503, body))
    used = (meter.prompt_tokens or 0) + meter.completion_tokens
    record = usage_record(batch, line, admission, inference, meter)
    if status_code != 200:
        return Outcome(LineState.FAILED, result_line(line, status_code, body), admission, record, used)
    stored = None
    if parsed is not None:
        body = responses.response_object(parsed, body, responses.new_response_id(), int(time.time()))
        stored = body if parsed.store is not False else None
    return Outcome(LineState.DONE, result_line(line, 200, body), admission, record, used, stored, parsed, history)


def forward(admission: quotas.Admission, inference, meter: proxy.Meter, client: httpx.Client,
            request_id: str) -> tuple[int | None, dict]:
    """POST the line to the admitted replica: (status code, body), the status None when unreachable."""
    from .views import Forward  # the one place that builds the engine's payload

    upstream = admission.upstream
    payload = Forward(request_id, inference, admission).payload()
    catalog.started(upstream)
    try:
        response = client.post(f"{upstream.base_url}/v1/{inference.endpoint}", content=payload,
                               headers=proxy.upstream_headers(upstream, request_id))
    except httpx.HTTPError as exc:
        meter.status, error = proxy.upstream_failure(exc)
        meter.http_status = error.status
        body = error_body(error.message, error.type, error.code, error.param)
        if meter.status == UsageStatus.UPSTREAM_UNAVAILABLE:
            return None, body
        count_unreported(admission, inference, meter)  # the engine had it: what it did is billed
        return error.status, body
    finally:
        catalog.finished(upstream)
    if response.status_code != 200:
        error = proxy.upstream_error_response(response.status_code, response.content)
        meter.status = UsageStatus.REJECTED_UPSTREAM if error.status < 500 else UsageStatus.UPSTREAM_ERROR
        meter.http_status = error.status
        return error.status, error_body(error.message, error.type, error.code, error.param)
    try:
        body = json.loads(response.content)
        if "error" in body:  # the engine failed after its keep-alive 200
            raise ValueError
        meter.take_usage(body.get("usage"))
    except (ValueError, AttributeError, TypeError):
        meter.status, meter.http_status = UsageStatus.UPSTREAM_ERROR, 502
        count_unreported(admission, inference, meter)
        return 502, error_body("The model server sent an invalid response.", "server_error", "upstream_error")
    meter.mark_first_token()
    return 200, body


def count_unreported(admission: quotas.Admission, inference, meter: proxy.Meter) -> None:
    builder = prompt_count.cached(admission.upstream) or None
    if builder is not None:
        tool_format = admission.entry.model.tool_format if inference.endpoint == "chat/completions" else None
        prompt_count.count_cut(builder, inference, tool_format, meter)


def usage_record(batch: Batch, line: BatchLine, admission: quotas.Admission, inference, meter: proxy.Meter) -> UsageRecord:
    """The line's one usage record: source batch, priced with the model's batch discount."""
    model, caller = admission.entry.model, admission.caller
    prompt = meter.prompt_tokens or 0
    cached = min(meter.cached_tokens, prompt)
    return UsageRecord(
        organization_id=batch.organization_id, api_key_id=caller.api_key.pk, user_id=caller.user_id,
        source=caller.source, entitlement_id=admission.hold.entitlement_id, model_id=model.pk, model_name=model.name,
        deployment_id=admission.upstream.id, endpoint=inference.usage_endpoint or inference.endpoint,
        prompt_tokens=prompt, cached_tokens=cached, completion_tokens=meter.completion_tokens,
        cost=model.batch_cost(prompt, cached, meter.completion_tokens), status=meter.status,
        http_status=meter.http_status, stream=False, time_to_first_token_ms=meter.ttft_ms,
        latency_ms=meter.latency_ms, request_id=line.request_id,
    )


def commit(batch: Batch, owner: str, line: BatchLine, outcome: Outcome) -> None:
    """Settle, record, answer and count the line in one transaction (see the module's docstring)."""
    admission = outcome.admission
    record = outcome.record
    try:
        with transaction.atomic():
            if admission is not None:
                quotas.settle(admission.hold, outcome.used, record, admission.caller.api_key)
            if not BatchLine.objects.filter(pk=line.pk, state=LineState.PENDING).update(
                    state=outcome.state, result=outcome.result):
                raise LeaseLost
            done = outcome.state == LineState.DONE
            guard(batch, owner, completed=F("completed") + int(done), failed=F("failed") + int(not done),
                  input_tokens=F("input_tokens") + (record.prompt_tokens if record else 0),
                  cached_tokens=F("cached_tokens") + (record.cached_tokens if record else 0),
                  output_tokens=F("output_tokens") + (record.completion_tokens if record else 0))
            if outcome.stored is not None:
                responses.store(batch.organization_id, batch.api_key_id, outcome.parsed, outcome.stored, outcome.history)
    except IntegrityError:  # the line's usage record exists: it was settled already; nothing more is billed
        logger.error("batch %s line %s: already settled", batch.batch_id, line.custom_id)
        raise LeaseLost from None
    finally:
        if admission is not None:
            get_limiter().release(admission.decision, outcome.used)


# -- finalizing → completed | cancelled | expired --------------------------------------------------
def finalize(batch: Batch, owner: str) -> None:
    """Write the output and error files from the lines' results and end the batch."""
    now = timezone.now()
    if batch.status == BatchStatus.CANCELLING:
        end, reason = BatchStatus.CANCELLED, ("batch_cancelled", "The batch was cancelled before this request ran.")
    elif batch.expires_at <= now and batch.lines.filter(state=LineState.PENDING).exists():
        end, reason = BatchStatus.EXPIRED, ("batch_expired", "The batch expired before this request ran.")
    else:
        end, reason = BatchStatus.COMPLETED, None
    with transaction.atomic():
        if reason is not None:
            left = list(batch.lines.filter(state=LineState.PENDING))
            for line in left:
                line.state = LineState.CANCELLED
                line.result = {"id": line.request_id, "custom_id": line.custom_id, "response": None,
                               "error": {"code": reason[0], "message": reason[1]}}
            BatchLine.objects.bulk_update(left, ["state", "result"])
            if left:
                guard(batch, owner, failed=F("failed") + len(left))
        output, errors = [], []
        for state, result in batch.lines.order_by("line").values_list("state", "result"):
            (output if state == LineState.DONE else errors).append(json.dumps(result) + "\n")
        changes = {"status": end, f"{end}_at": now}
        if end == BatchStatus.COMPLETED and batch.finalizing_at is None:
            changes["finalizing_at"] = now
        if output:
            changes["output_file"] = files.save_output(batch.organization, f"{batch.batch_id}_output.jsonl",
                                                       "".join(output).encode(), batch.output_retention_seconds)
        if errors:
            changes["error_file"] = files.save_output(batch.organization, f"{batch.batch_id}_error.jsonl",
                                                      "".join(errors).encode(), batch.output_retention_seconds)
        guard(batch, owner, **changes)
