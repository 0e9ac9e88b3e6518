"""Rows of the Batch API: uploaded and produced files, batches, and one row per input line.

A line's row is the batch's unit of idempotency: it is unique per (batch, custom_id), moves
pending → done | failed once, and its result is written in the same transaction that settles its
token hold and inserts its usage record, so a worker killed at any point never loses or bills a line
twice (see inference/batch_runner.py)."""

from __future__ import annotations

import secrets

from django.core.files.storage import storages
from django.db import models

from accounts.models import APIKey, Organization, TenantOwned


def batch_storage():
    """Where the files' bytes live: STORAGES["batch_files"] (a local directory unless configured)."""
    return storages["batch_files"]


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class FilePurpose(models.TextChoices):
    BATCH = "batch", "Batch input"
    BATCH_OUTPUT = "batch_output", "Batch output or errors"


class StoredFile(TenantOwned):
    """One /v1/files object; its bytes are in `batch_storage()` under the organization's prefix."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    file_id = models.CharField(max_length=64, unique=True, default=new_file_id)
    api_key = models.ForeignKey(APIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    purpose = models.CharField(max_length=32, choices=FilePurpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.BigIntegerField()
    content = models.FileField(storage=batch_storage, max_length=300)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.file_id} {self.filename}"


class BatchStatus(models.TextChoices):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# Statuses that count against BATCH_MAX_ACTIVE_PER_ORGANIZATION and that a runner works on.
ACTIVE_STATUSES = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING)


class Batch(TenantOwned):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    batch_id = models.CharField(max_length=64, unique=True, default=new_batch_id)
    api_key = models.ForeignKey(APIKey, null=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.CharField(max_length=64)
    completion_window = models.CharField(max_length=8, default="24h")
    input_file = models.ForeignKey(StoredFile, null=True, on_delete=models.SET_NULL, related_name="+")
    input_file_name = models.CharField(max_length=64, help_text="The input file's id, kept after its deletion.")
    output_file = models.ForeignKey(StoredFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    error_file = models.ForeignKey(StoredFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    status = models.CharField(max_length=16, choices=BatchStatus.choices, default=BatchStatus.VALIDATING)
    errors = models.JSONField(null=True, blank=True, help_text="Why validation failed: BatchError objects.")
    metadata = models.JSONField(null=True, blank=True)
    model_name = models.CharField(max_length=128, blank=True)
    output_retention_seconds = models.PositiveIntegerField(null=True, blank=True, help_text="output_expires_after")
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    lease_owner = models.CharField(max_length=64, blank=True, help_text="The runner working on the batch.")
    lease_until = models.DateTimeField(null=True, blank=True, help_text="It holds the batch until then.")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"

    def __str__(self) -> str:
        return f"{self.batch_id} {self.status}"


class LineState(models.TextChoices):
    PENDING = "pending"
    DONE = "done"  # answered with status 200: in the output file
    FAILED = "failed"  # refused or failed: in the error file
    CANCELLED = "cancelled"  # not run (the batch was cancelled or expired): in the error file


class BatchLine(models.Model):
    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="lines")
    line = models.PositiveIntegerField(help_text="1-based line number in the input file.")
    custom_id = models.CharField(max_length=512)
    request_id = models.CharField(max_length=64, unique=True, help_text="Its usage record's request_id.")
    body = models.JSONField()
    state = models.CharField(max_length=16, choices=LineState.choices, default=LineState.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    result = models.JSONField(null=True, blank=True, help_text="The output or error file's line.")

    class Meta:
        ordering = ["batch", "line"]
        constraints = [models.UniqueConstraint(fields=["batch", "custom_id"], name="one_line_per_custom_id")]
        indexes = [models.Index(fields=["batch", "state"])]

    def __str__(self) -> str:
        return f"{self.batch_id}:{self.custom_id} {self.state}"
