"""/v1/batches services and selectors: create (checks, limits, then the runner is queued), retrieve,
list, cancel. The work itself is inference/batch_runner.py's, on a Celery worker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.models import Organization

from . import files
from .batch_models import ACTIVE_STATUSES, Batch, BatchStatus, FilePurpose
from .errors import NO_RETRY, GatewayError

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
CREATE_FIELDS = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
TIMESTAMPS = ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def not_found(batch_id: str) -> GatewayError:
    return GatewayError(404, f"No batch found with id '{batch_id}'.", "invalid_request_error", None, "batch_id")


def _seconds(value) -> int | None:
    return None if value is None else int(value.timestamp())


def batch_object(batch: Batch) -> dict:
    """OpenAI's Batch object."""
    body: dict[str, Any] = {
        "id": batch.batch_id, "object": "batch", "endpoint": batch.endpoint, "errors": batch.errors,
        "input_file_id": batch.input_file_name, "completion_window": batch.completion_window, "status": batch.status,
        "output_file_id": batch.output_file.file_id if batch.output_file else None,
        "error_file_id": batch.error_file.file_id if batch.error_file else None,
        "created_at": _seconds(batch.created_at), "expires_at": _seconds(batch.expires_at),
        **{name: _seconds(getattr(batch, name)) for name in TIMESTAMPS},
        "request_counts": {"total": batch.total, "completed": batch.completed, "failed": batch.failed},
        "usage": {"input_tokens": batch.input_tokens, "input_tokens_details": {"cached_tokens": batch.cached_tokens},
                  "output_tokens": batch.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": batch.input_tokens + batch.output_tokens},
        "metadata": batch.metadata,
    }
    if batch.model_name:
        body["model"] = batch.model_name
    # The spec's fields are not nullable: one that does not apply (yet) is left out.
    return {name: value for name, value in body.items() if value is not None or name == "metadata"}


def _check_metadata(metadata) -> None:
    if metadata is None:
        return
    if (not isinstance(metadata, dict) or len(metadata) > 16
            or any(not isinstance(k, str) or len(k) > 64 or not isinstance(v, str) or len(v) > 512 for k, v in metadata.items())):
        raise GatewayError(400, "'metadata' must be an object of at most 16 string values (keys up to 64 characters,"
                           " values up to 512).", code="invalid_type", param="metadata")


def _output_seconds(policy) -> int | None:
    if policy is None:
        return None
    if (not isinstance(policy, dict) or set(policy) != {"anchor", "seconds"} or policy["anchor"] != "created_at"
            or not isinstance(policy["seconds"], int) or isinstance(policy["seconds"], bool)
            or not 3600 <= policy["seconds"] <= 2592000):
        raise GatewayError(400, "'output_expires_after' must be {\"anchor\": \"created_at\", \"seconds\": 3600..2592000}.",
                           code="invalid_value", param="output_expires_after")
    return policy["seconds"]


def create(organization: Organization, api_key_id: int | None, body: Any) -> Batch:
    """A new batch in `validating`, its runner queued once the row is committed: 400 naming the field for a
    bad body, 404 for an input file that is not the organization's, 429 over
    BATCH_MAX_ACTIVE_PER_ORGANIZATION."""
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_type")
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise GatewayError(400, f"Unrecognized request argument supplied: {unknown[0]}", code="unknown_parameter",
                           param=unknown[0])
    for name in ("input_file_id", "endpoint", "completion_window"):
        if body.get(name) is None:
            raise GatewayError(400, f"Missing required parameter: '{name}'.", code="missing_required_parameter", param=name)
        if not isinstance(body[name], str):
            raise GatewayError(400, f"'{name}' must be a string.", code="invalid_type", param=name)
    if body["endpoint"] not in ENDPOINTS:
        raise GatewayError(400, f"Invalid value for 'endpoint': '{body['endpoint']}'. Supported: {', '.join(ENDPOINTS)}.",
                           code="invalid_value", param="endpoint")
    if body["completion_window"] != "24h":
        raise GatewayError(400, f"Invalid value for 'completion_window': '{body['completion_window']}'. Supported: '24h'.",
                           code="invalid_value", param="completion_window")
    _check_metadata(body.get("metadata"))
    output_seconds = _output_seconds(body.get("output_expires_after"))
    input_file = files.get(organization, body["input_file_id"])
    if input_file.purpose != FilePurpose.BATCH:
        raise GatewayError(400, f"The file {input_file.file_id} has purpose '{input_file.purpose}'; a batch's input needs"
                           " purpose 'batch'.", code="invalid_value", param="input_file_id")
    with transaction.atomic():
        Organization.objects.select_for_update().filter(pk=organization.pk).first()  # one count at a time per org
        active = Batch.objects.for_org(organization).filter(status__in=ACTIVE_STATUSES).count()
        if active >= settings.BATCH_MAX_ACTIVE_PER_ORGANIZATION:
            raise GatewayError(429, f"Your organization has {active} batches in progress; the limit is"
                               f" {settings.BATCH_MAX_ACTIVE_PER_ORGANIZATION}. Wait for one to finish.",
                               "invalid_request_error", "batch_limit_exceeded", headers=NO_RETRY)
        batch = Batch.objects.create(
            organization=organization, api_key_id=api_key_id, endpoint=body["endpoint"], input_file=input_file,
            input_file_name=input_file.file_id, metadata=body.get("metadata"),
            expires_at=timezone.now() + timedelta(seconds=settings.BATCH_COMPLETION_WINDOW_SECONDS),
            output_retention_seconds=output_seconds,
        )
        transaction.on_commit(lambda: queue(batch.pk))
    return batch


def queue(batch_pk: int, countdown: float | None = None) -> None:
    from .tasks import run_batch

    run_batch.apply_async((batch_pk,), countdown=countdown)


def get(organization: Organization, batch_id: str) -> Batch:
    found = (Batch.objects.for_org(organization).select_related("output_file", "error_file")
             .filter(batch_id=batch_id).first())
    if found is None:
        raise not_found(batch_id)
    return found


def listing(organization: Organization, limit: int, after: str | None) -> dict:
    batches = Batch.objects.for_org(organization).select_related("output_file", "error_file")
    return files.page(batches, "batch_id", limit, "desc", after, batch_object, not_found)


def cancel(organization: Organization, batch_id: str) -> Batch:
    """validating or in_progress → cancelling (the runner then stops, writes what is done and ends in
    cancelled); cancelling or cancelled as they are; 409 for a batch that has ended otherwise."""
    with transaction.atomic():
        batch = get(organization, batch_id)
        batch = Batch.objects.select_for_update().get(pk=batch.pk)
        if batch.status in (BatchStatus.CANCELLING, BatchStatus.CANCELLED):
            return get(organization, batch_id)
        if batch.status not in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS):
            raise GatewayError(409, f"Cannot cancel a batch with status '{batch.status}'.", "invalid_request_error",
                               "batch_not_cancellable")
        batch.status, batch.cancelling_at = BatchStatus.CANCELLING, timezone.now()
        batch.save(update_fields=["status", "cancelling_at"])
        transaction.on_commit(lambda: queue(batch.pk))  # finishes it even when no runner holds it now
    return get(organization, batch_id)
