"""/v1/files services and selectors: uploads for the Batch API and the files batches produce.

Every query starts from the organization (`for_org`): another organization's file id is a 404, the
same answer as an id that never existed."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.core.files.base import ContentFile, File
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.models import Organization

from .batch_models import FilePurpose, StoredFile
from .errors import GatewayError

UPLOAD_PURPOSES = {FilePurpose.BATCH}


def not_found(file_id: str) -> GatewayError:
    return GatewayError(404, f"No such File object: {file_id}", "invalid_request_error", None, "id")


def file_object(stored: StoredFile) -> dict:
    """OpenAI's File object."""
    body = {"id": stored.file_id, "object": "file", "bytes": stored.bytes, "created_at": int(stored.created_at.timestamp()),
            "filename": stored.filename, "purpose": stored.purpose, "status": "processed"}
    if stored.expires_at is not None:
        body["expires_at"] = int(stored.expires_at.timestamp())
    return body


def storage_name(organization: Organization, file_id: str) -> str:
    return f"org-{organization.pk}/{file_id}.jsonl"


def upload(organization: Organization, api_key_id: int | None, uploaded: File | None, purpose: str | None) -> StoredFile:
    """Store an uploaded file: 400 naming `purpose` or `file` when one is missing or not accepted."""
    if purpose is None:
        raise GatewayError(400, "Missing required parameter: 'purpose'.", code="missing_required_parameter", param="purpose")
    if purpose not in UPLOAD_PURPOSES:
        raise GatewayError(400, f"Invalid value for 'purpose': '{purpose}'. This server accepts only 'batch'.",
                           code="invalid_value", param="purpose")
    if uploaded is None:
        raise GatewayError(400, "Missing required parameter: 'file' (send it as multipart/form-data).",
                           code="missing_required_parameter", param="file")
    if uploaded.size > settings.BATCH_MAX_FILE_BYTES:
        raise GatewayError(400, f"The file is {uploaded.size} bytes; the limit is {settings.BATCH_MAX_FILE_BYTES} bytes.",
                           code="file_too_large", param="file")
    return save(organization, api_key_id, uploaded, (uploaded.name or "upload.jsonl")[-255:], purpose)


def save(organization: Organization, api_key_id: int | None, content: File, filename: str, purpose: str,
         expires_at=None) -> StoredFile:
    """A new file of the organization: its bytes to the storage first, then its row (a crash between the
    two leaves unreferenced bytes, never a row without bytes)."""
    stored = StoredFile(organization=organization, api_key_id=api_key_id, purpose=purpose, filename=filename,
                        bytes=content.size, expires_at=expires_at)
    stored.content.save(storage_name(organization, stored.file_id), content, save=False)
    stored.save(force_insert=True)
    return stored


def save_output(organization: Organization, name: str, data: bytes, retention_seconds: int | None) -> StoredFile:
    """A file a batch produced (purpose batch_output), expiring after `retention_seconds` or
    BATCH_FILES_RETENTION_DAYS."""
    seconds = retention_seconds or settings.BATCH_FILES_RETENTION_DAYS * 86400
    return save(organization, None, ContentFile(data), name, FilePurpose.BATCH_OUTPUT,
                timezone.now() + timedelta(seconds=seconds))


def get(organization: Organization, file_id: str) -> StoredFile:
    found = StoredFile.objects.for_org(organization).filter(file_id=file_id).first()
    if found is None or (found.expires_at is not None and found.expires_at <= timezone.now()):
        raise not_found(file_id)
    return found


def read(stored: StoredFile) -> bytes:
    with stored.content.open("rb") as handle:
        return handle.read()


def delete(organization: Organization, file_id: str) -> dict:
    stored = get(organization, file_id)
    remove(stored)
    return {"id": file_id, "object": "file", "deleted": True}


def remove(stored: StoredFile) -> None:
    """The row, then (once it is gone for good) the bytes."""
    name, storage = stored.content.name, stored.content.storage
    with transaction.atomic():
        stored.delete()
        transaction.on_commit(lambda: storage.delete(name))


def listing(organization: Organization, purpose: str | None, limit: int, order: str, after: str | None) -> dict:
    files = StoredFile.objects.for_org(organization).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))
    if purpose:
        files = files.filter(purpose=purpose)
    return page(files, "file_id", limit, order, after, file_object, not_found, empty_id="")


def page(queryset, id_field: str, limit: int, order: str, after: str | None, render, missing,
         empty_id: str | None = None) -> dict:
    """One page of a cursor-paginated list (`after` an id of the previous page): OpenAI's list shape. An
    empty page has no first and last id: left out, or `empty_id` where the spec requires the fields."""
    descending = order == "desc"
    queryset = queryset.order_by(*(["-created_at", "-id"] if descending else ["created_at", "id"]))
    if after:
        cursor = queryset.filter(**{id_field: after}).values_list("created_at", "id").first()
        if cursor is None:
            raise missing(after)
        created_at, pk = cursor
        if descending:
            queryset = queryset.filter(created_at__lte=created_at).exclude(created_at=created_at, id__gte=pk)
        else:
            queryset = queryset.filter(created_at__gte=created_at).exclude(created_at=created_at, id__lte=pk)
    rows = list(queryset[: limit + 1])
    data = [render(row) for row in rows[:limit]]
    body = {"object": "list", "data": data, "has_more": len(rows) > limit}
    if data or empty_id is not None:
        body["first_id"], body["last_id"] = (data[0]["id"], data[-1]["id"]) if data else (empty_id, empty_id)
    return body


def purge_expired(now=None) -> int:
    """Delete the files past their expiry (Celery beat: inference.tasks.purge_expired_files)."""
    expired = list(StoredFile.objects.filter(expires_at__lte=now or timezone.now()))
    for stored in expired:
        remove(stored)
    return len(expired)
