"""The batch runner's bookkeeping in the database alone (no engine): one runner per batch, the resume
sweep, a lost lease never commits a line, and the purge of expired files."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.utils import timezone

from inference import batch_runner, files
from inference.batch_models import Batch, BatchLine, BatchStatus, LineState, StoredFile

from .conftest import make_tenant

pytestmark = pytest.mark.django_db


def make_batch(tenant, status=BatchStatus.IN_PROGRESS, **fields) -> Batch:
    source = files.save(tenant.organization, None, ContentFile(b"{}\n"), "in.jsonl", "batch")
    return Batch.objects.create(organization=tenant.organization, api_key=tenant.api_key, endpoint="/v1/chat/completions",
                                input_file=source, input_file_name=source.file_id, status=status,
                                expires_at=timezone.now() + timedelta(days=1), **fields)


def test_a_batch_held_by_a_live_runner_is_not_taken_by_a_second():
    batch = make_batch(make_tenant("runner-busy"), lease_owner="other", lease_until=timezone.now() + timedelta(minutes=1))
    assert batch_runner.run(batch.pk) == "busy"
    batch.refresh_from_db()
    assert (batch.status, batch.lease_owner) == (BatchStatus.IN_PROGRESS, "other")


def test_a_lapsed_lease_is_taken_over_and_the_batch_finished():
    """The runner of a killed worker stops renewing: after BATCH_LEASE_SECONDS another takes over."""
    batch = make_batch(make_tenant("runner-lapsed"), lease_owner="dead", lease_until=timezone.now() - timedelta(seconds=1))
    assert batch_runner.run(batch.pk) == BatchStatus.COMPLETED  # no lines left: straight to the end
    batch.refresh_from_db()
    assert batch.lease_owner == "" and batch.completed_at is not None


def test_resume_queues_every_unfinished_batch(settings):
    tenant = make_tenant("runner-resume")
    unfinished = [make_batch(tenant), make_batch(tenant, status=BatchStatus.CANCELLING)]
    make_batch(tenant, status=BatchStatus.COMPLETED)
    assert batch_runner.resume() == 2  # eager in tests: each queued runner ran
    statuses = sorted(Batch.objects.filter(pk__in=[b.pk for b in unfinished]).values_list("status", flat=True))
    assert statuses == [BatchStatus.CANCELLED, BatchStatus.COMPLETED]


def test_a_runner_that_lost_its_lease_commits_nothing():
    batch = make_batch(make_tenant("runner-lost"), lease_owner="new-runner", lease_until=timezone.now() + timedelta(minutes=1))
    line = BatchLine.objects.create(batch=batch, line=1, custom_id="a", request_id="batch_req_lost", body={})
    outcome = batch_runner.Outcome(LineState.FAILED, {"custom_id": "a"})
    with pytest.raises(batch_runner.LeaseLost):
        batch_runner.commit(batch, "old-runner", line, outcome)
    line.refresh_from_db()
    batch.refresh_from_db()
    assert (line.state, line.result, batch.failed) == (LineState.PENDING, None, 0)


def test_expired_output_files_are_purged_and_uploads_kept(django_capture_on_commit_callbacks):
    tenant = make_tenant("runner-purge")
    kept = files.save(tenant.organization, None, ContentFile(b"{}\n"), "in.jsonl", "batch")
    gone = files.save_output(tenant.organization, "out.jsonl", b"{}\n", 3600)
    StoredFile.objects.filter(pk=gone.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    storage, name = gone.content.storage, gone.content.name
    assert storage.exists(name)
    with django_capture_on_commit_callbacks(execute=True):
        assert files.purge_expired() == 1
    assert list(StoredFile.objects.filter(organization=tenant.organization)) == [kept]
    assert not storage.exists(name) and kept.content.storage.exists(kept.content.name)


def test_empty_lists_are_on_the_spec():
    from inference import batches
    from tests.openapi_spec import validate_response

    organization = make_tenant("runner-empty").organization
    validate_response("/v1/files", "get", 200, files.listing(organization, None, 20, "desc", None))
    validate_response("/v1/batches", "get", 200, batches.listing(organization, 20, None))
