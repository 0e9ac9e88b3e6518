"""Audit log (django-pghistory): PostgreSQL triggers record every insert, update and delete of the audited
models, with the context of the change (who, from which IP, through which URL or management command).

- `audited` declares a model audited: a snapshot of every field but its secrets after each insert and
  update, and before each delete. An UPDATE that changes only the model's `quiet` fields (counters the
  gateway writes on every request, health-check state) records nothing, so metering writes no audit row.
- `AuditContextMiddleware` attaches the acting user, IP, method and URL to every change a console or
  admin request makes; it skips `/v1/` (the gateway's hot path pays nothing) and non-PostgreSQL databases.
- `command_context` does the same for management commands (the command's name and the OS user).
- `organization_events` is the selector of the console's audit page: events of one organization's rows.

The triggers exist on PostgreSQL only: on SQLite (`make run`) the event tables are created empty and
nothing is recorded (pgtrigger's migration operations skip other databases).
"""

from __future__ import annotations

import contextlib
import getpass
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pghistory
import pgtrigger
from django.apps import apps
from django.db import connection
from django.db.models import OuterRef, Subquery
from pghistory.middleware import HistoryMiddleware

# Event models of rows that belong to one organization (their snapshot has `organization`).
TENANT_EVENT_MODELS = ("accounts.MembershipEvent", "accounts.InvitationEvent", "accounts.EntitlementEvent", "accounts.APIKeyEvent",
                       "inference.BudgetEvent")
# Server processes (their changes are a request's or the gateway's, never "the command's") and the test runner.
UNTRACKED_COMMANDS = frozenset({"runserver", "runplatform", "test", "testserver"})


def audited(*, secret: tuple[str, ...] = (), quiet: tuple[str, ...] = ()):
    """Class decorator: audit-log events for every insert, update and delete of the model.

    `secret` fields are left out of the snapshot but a change to one still records an event;
    `quiet` fields are left out and an UPDATE that changes only them records nothing."""

    def wrap(model):
        watched = [f.name for f in model._meta.concrete_fields if f.name not in quiet]
        return pghistory.track(
            pghistory.InsertEvent(),
            pghistory.UpdateEvent(condition=pgtrigger.AnyChange(*watched)),
            pghistory.DeleteEvent(),
            exclude=[*secret, *quiet] or None,
            model_name=f"{model.__name__}Event",
            append_only=True,
        )(model)

    return wrap


def recording() -> bool:
    """pghistory's context rides on `set_config`, a PostgreSQL function: elsewhere it must stay off."""
    return connection.vendor == "postgresql"


def client_ip(request) -> str | None:
    # REMOTE_ADDR is the peer, or the client uvicorn took from X-Forwarded-For of a trusted proxy
    # (FORWARDED_ALLOW_IPS): never a header the client chose.
    return request.META.get("REMOTE_ADDR") or None


class AuditContextMiddleware(HistoryMiddleware):
    """pghistory's middleware with the client IP and method; nothing at all under /v1/ or off PostgreSQL."""

    SKIPPED_PREFIXES = ("/v1", "/static/", "/health", "/metrics")

    def get_context(self, request) -> dict[str, Any]:
        context = super().get_context(request)
        user = getattr(request, "user", None)
        if user is not None and user.is_authenticated:
            context["email"] = user.email
        return {**context, "ip": client_ip(request), "method": request.method}

    def __call__(self, request):
        if request.path.startswith(self.SKIPPED_PREFIXES) or not recording():
            return self.get_response(request)
        return super().__call__(request)


def command_context(name: str):
    """The audit context of a management command run (a no-op context off PostgreSQL)."""
    if name in UNTRACKED_COMMANDS or not recording():
        return contextlib.nullcontext()
    try:
        os_user = getpass.getuser()
    except (KeyError, OSError):
        os_user = None
    return pghistory.context(command=name, os_user=os_user)


def install_command_hook() -> None:
    """Every management command (the project's, Django's, `shell`) runs inside `command_context`.
    Django has no hook around a command's `execute`, so it is wrapped once here (AccountsConfig.ready)."""
    from django.core.management.base import BaseCommand

    if getattr(BaseCommand.execute, "audited", False):
        return
    original = BaseCommand.execute

    def execute(self, *args, **options):
        with command_context(self.__class__.__module__.rsplit(".", 1)[-1]):
            return original(self, *args, **options)

    execute.audited = True
    BaseCommand.execute = execute


# ---- reading ---------------------------------------------------------------------------------------


@dataclass
class AuditEntry:
    """One audited change, as the console shows it."""

    at: datetime
    model: str
    object_id: Any
    action: str  # insert, update, delete
    actor: str  # an email, "command NAME (os user)", or "system"
    ip: str | None
    url: str | None
    changes: list[tuple[str, Any, Any]]  # (field, before, after); for an update only the fields that changed


def snapshot(event) -> dict[str, Any]:
    fields = [f for f in event._meta.concrete_fields if not f.name.startswith("pgh_")]
    return {f.name: f.value_from_object(event) for f in fields}


def actor(metadata: dict[str, Any] | None) -> str:
    metadata = metadata or {}
    if metadata.get("email"):
        return metadata["email"]
    if metadata.get("user"):
        return f"user #{metadata['user']}"
    if metadata.get("command"):
        return f"command {metadata['command']}" + (f" ({metadata['os_user']})" if metadata.get("os_user") else "")
    return "system"


def entries(events, event_model, limit: int | None = None) -> list[AuditEntry]:
    """`events` (a queryset of `event_model`), newest first, with before/after: the object's previous
    event is its state before an update (one subquery, one bulk fetch)."""
    previous_event = (
        event_model.objects.filter(pgh_obj_id=OuterRef("pgh_obj_id"), pgh_id__lt=OuterRef("pgh_id")).order_by("-pgh_id").values("pgh_id")[:1]
    )
    events = events.select_related("pgh_context").annotate(previous_id=Subquery(previous_event)).order_by("-pgh_id")
    events = list(events[:limit] if limit else events)
    previous_ids = {e.pgh_id: e.previous_id for e in events if e.pgh_label == "update"}
    previous = event_model.objects.in_bulk([pk for pk in previous_ids.values() if pk is not None])
    out = []
    for event in events:
        data = snapshot(event)
        if event.pgh_label == "insert":
            changes = [(name, None, value) for name, value in data.items()]
        elif event.pgh_label == "delete":
            changes = [(name, value, None) for name, value in data.items()]
        else:
            before_event = previous.get(previous_ids.get(event.pgh_id))
            before = snapshot(before_event) if before_event is not None else {}
            changes = [(name, before.get(name), value) for name, value in data.items() if before.get(name) != value]
        metadata = event.pgh_context.metadata if event.pgh_context_id else {}
        out.append(
            AuditEntry(
                at=event.pgh_created_at,
                model=event_model.pgh_tracked_model._meta.verbose_name,
                object_id=event.pgh_obj_id,
                action=event.pgh_label,
                actor=actor(metadata),
                ip=metadata.get("ip"),
                url=metadata.get("url"),
                changes=changes,
            )
        )
    return out


def organization_events(organization, limit: int = 200) -> list[AuditEntry]:
    """The latest changes to `organization` and to the rows it owns (members, invitations, entitlements,
    API keys, budgets), newest first. Every query starts from the organization."""
    found: list[AuditEntry] = []
    org_events = apps.get_model("accounts.OrganizationEvent")
    found += entries(org_events.objects.filter(pgh_obj_id=organization.pk), org_events, limit)
    for label in TENANT_EVENT_MODELS:
        model = apps.get_model(label)
        found += entries(model.objects.filter(organization_id=organization.pk), model, limit)
    found.sort(key=lambda entry: entry.at, reverse=True)
    return found[:limit]
