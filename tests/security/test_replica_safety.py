"""Platform-run replicas are least-privilege and confined: only staff holding `operate_replica` start, stop or
restart them (a staff user who may edit the catalog may not), every such action is an audit event with who
and from where, and a source never reaches outside MODELS_DIR (`..`, absolute paths, symlinks out)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from accounts.models import User
from inference import sources
from inference.launcher import Launcher
from inference.models import AIModel, Replica, ReplicaEvent, ReplicaState, ReplicaStatus

from ..inference.launcher_helpers import write_metadata_gguf

pytestmark = pytest.mark.django_db


@pytest.fixture
def models_dir(tmp_path, settings) -> Path:
    """MODELS_DIR with one servable GGUF, beside an `outside` directory holding another."""
    inside, outside = tmp_path / "models", tmp_path / "outside"
    inside.mkdir()
    (outside / "hf").mkdir(parents=True)
    write_metadata_gguf(outside / "secret.gguf")
    write_metadata_gguf(inside / "ok.gguf")
    (inside / "link-out.gguf").symlink_to(outside / "secret.gguf")
    (inside / "dir-out").symlink_to(outside / "hf")
    (outside / "hf" / "config.json").write_text('{"model_type": "llama"}')
    (inside / "sub").mkdir()
    (inside / "sub" / "inside-link.gguf").symlink_to(inside / "ok.gguf")  # a symlink within stays servable
    settings.MODELS_DIR = str(inside)
    settings.LAUNCHER_STATE_DIR = str(tmp_path / "state")
    return inside


def staff(email: str, *perms: str) -> Client:
    user = User.objects.create_user(email, "pw-not-used-123", is_staff=True)
    for perm in perms:
        app, codename = perm.split(".")
        user.user_permissions.add(Permission.objects.get(content_type__app_label=app, codename=codename))
    client = Client()
    client.force_login(user)
    return client


CATALOG_EDITOR = ("inference.view_aimodel", "inference.add_aimodel", "inference.change_aimodel",
                  "inference.view_replica", "inference.change_replica", "inference.add_replica")


def test_staff_without_operate_replica_can_neither_start_nor_stop_replicas(models_dir):
    model = AIModel.objects.create(name="ok", source="ok.gguf")
    editor = staff("editor@example.com", *CATALOG_EDITOR)

    page = editor.get("/admin/inference/aimodel/")
    assert page.status_code == 200 and b"start_replica" not in page.content
    editor.post("/admin/inference/aimodel/", {"action": "start_replica", "_selected_action": [model.pk]})
    assert not Replica.objects.exists()
    assert editor.get("/admin/inference/replica/add/").status_code == 403

    replica = Replica.objects.create(model=model)
    editor.post("/admin/inference/replica/", {"action": "stop", "_selected_action": [replica.pk]})
    editor.post(f"/admin/inference/replica/{replica.pk}/delete/", {"post": "yes"})
    replica.refresh_from_db()
    assert replica.desired == ReplicaState.RUNNING

    # The same kind of user with the dedicated permission can.
    operator = staff("operator@example.com", *CATALOG_EDITOR, "inference.operate_replica")
    assert b"start_replica" in operator.get("/admin/inference/aimodel/").content
    operator.post("/admin/inference/replica/", {"action": "stop", "_selected_action": [replica.pk]})
    replica.refresh_from_db()
    assert replica.desired == ReplicaState.STOPPED


def test_start_stop_and_restart_are_audit_events_with_the_operator_and_ip(models_dir):
    model = AIModel.objects.create(name="ok", source="ok.gguf")
    operator = staff("operator@example.com", *CATALOG_EDITOR, "inference.operate_replica")
    user = User.objects.get(email="operator@example.com")
    ip = {"REMOTE_ADDR": "203.0.113.9"}

    operator.post("/admin/inference/aimodel/", {"action": "start_replica", "_selected_action": [model.pk]}, **ip)
    replica = Replica.objects.get(model=model)
    operator.post("/admin/inference/replica/", {"action": "restart", "_selected_action": [replica.pk]}, **ip)
    operator.post("/admin/inference/replica/", {"action": "stop", "_selected_action": [replica.pk]}, **ip)
    # What the launcher writes while it watches (status, pid, log tail) is state, not an event.
    Replica.objects.filter(pk=replica.pk).update(status=ReplicaStatus.RUNNING, pid=123, log_tail="x")

    page = operator.get(f"/admin/inference/aimodel/{model.pk}/change/").content.decode()
    assert f"{replica}</a>: Running (wanted stopped)" in page  # what the launcher last saw, and the wish

    events = list(ReplicaEvent.objects.filter(pgh_obj_id=replica.pk).order_by("pgh_id"))
    assert [(e.pgh_label, e.desired, e.generation) for e in events] == [
        ("insert", "running", 1), ("update", "running", 2), ("update", "stopped", 2)]
    for event in events:
        assert event.pgh_context.metadata["user"] == user.pk
        assert event.pgh_context.metadata["ip"] == "203.0.113.9"


@pytest.mark.parametrize("source_id", ["../outside/secret.gguf", "sub/../../outside/secret.gguf", "link-out.gguf",
                                       "dir-out", "/etc/passwd", ""])
def test_a_source_outside_models_dir_is_refused(models_dir, source_id):
    with pytest.raises(sources.SourceError):
        sources.resolve(source_id)
    editor = staff("editor@example.com", "inference.add_aimodel", "inference.view_aimodel")
    response = editor.post("/admin/inference/aimodel/add/", {
        "name": "escape", "context_length": 2048, "visibility": "all", "price_input_per_million": 0,
        "price_cached_input_per_million": 0, "price_output_per_million": 0, "owned_by": "maas",
        "tool_format": "auto", "kind": "chat", "source": source_id or "x/../..",
        **{f"{prefix}-{name}": 0 for prefix in ("deployments", "fallback_links")
           for name in ("TOTAL_FORMS", "INITIAL_FORMS", "MIN_NUM_FORMS", "MAX_NUM_FORMS")},
    })
    assert response.status_code == 200 and "source" in response.context["adminform"].form.errors
    assert not AIModel.objects.filter(name="escape").exists()


def test_listing_shows_escapes_as_refused_and_keeps_a_symlink_within(models_dir):
    found, refused = sources.list_sources()
    ids = {s.id for s in found}
    assert {"ok.gguf", "sub/inside-link.gguf"} <= ids and not ids & {"link-out.gguf", "dir-out"}
    assert {source_id for source_id, _ in refused} >= {"link-out.gguf", "dir-out"}
    assert all("outside MODELS_DIR" in reason for source_id, reason in refused if source_id in ("link-out.gguf", "dir-out"))


def test_the_launcher_checks_the_path_again_when_it_starts_an_engine(models_dir):
    """A source swapped for a symlink out after it was added is refused at start: no process, a clear error."""
    model = AIModel.objects.create(name="ok", source="ok.gguf")
    replica = Replica.objects.create(model=model)
    (models_dir / "ok.gguf").unlink()
    (models_dir / "ok.gguf").symlink_to(models_dir.parent / "outside" / "secret.gguf")
    launcher = Launcher(io.StringIO())
    launcher.reconcile()
    replica.refresh_from_db()
    assert replica.status == ReplicaStatus.FAILED and replica.pid is None and not launcher.processes
    assert "outside MODELS_DIR" in replica.last_error


def test_the_launcher_registers_engines_only_where_deployments_may_point(models_dir, settings):
    """LAUNCHER_HOST outside DEPLOYMENT_ALLOWED_UPSTREAMS: the replica fails with the reason, nothing starts."""
    settings.DEPLOYMENT_ALLOWED_UPSTREAMS = ["10.0.0.0/8"]
    replica = Replica.objects.create(model=AIModel.objects.create(name="ok", source="ok.gguf"))
    launcher = Launcher(io.StringIO())
    launcher.reconcile()
    replica.refresh_from_db()
    assert replica.status == ReplicaStatus.FAILED and not launcher.processes and replica.deployment is None
    assert "not in DEPLOYMENT_ALLOWED_UPSTREAMS" in replica.last_error


def test_starting_replicas_one_of_which_lost_its_source_starts_none(models_dir):
    """Every source is checked before any replica changes: the action is refused whole, not half done."""
    kept = AIModel.objects.create(name="kept", source="ok.gguf")
    moved = AIModel.objects.create(name="moved", source="sub/inside-link.gguf")
    first = Replica.objects.create(model=kept, desired=ReplicaState.STOPPED)
    second = Replica.objects.create(model=moved, desired=ReplicaState.STOPPED)
    (models_dir / "sub" / "inside-link.gguf").unlink()  # the file moved after the replica was made
    operator = staff("operator@example.com", *CATALOG_EDITOR, "inference.operate_replica")
    page = operator.post("/admin/inference/replica/", {"action": "start", "_selected_action": [first.pk, second.pk]},
                         follow=True).content.decode()
    assert "inside-link.gguf" in page
    assert list(Replica.objects.order_by("pk").values_list("desired", flat=True)) == ["stopped", "stopped"]
