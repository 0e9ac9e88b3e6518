"""Audit log (django-pghistory, accounts/audit.py): a change through the console, the admin or a management
command is an event with who, from which IP, what and before/after; the gateway's per-request counters
write none; owners see their organization's events in the console, staff all of them in the admin; events
cannot be edited or deleted. The triggers are PostgreSQL's: these tests run on the real PostgreSQL."""

from __future__ import annotations

import getpass

import pytest
from django.contrib.auth.models import AnonymousUser
from django.core.management import call_command
from django.db import DatabaseError, transaction
from django.forms.models import model_to_dict

from accounts import audit
from accounts.models import (
    APIKey,
    APIKeyEvent,
    EntitlementEvent,
    Membership,
    MembershipEvent,
    OrganizationEvent,
    Role,
    User,
    UserEvent,
)
from inference import quotas
from inference.models import AIModel, AIModelEvent, Deployment, DeploymentEvent, UsageRecord, UsageStatus
from tests.processes import sqlite_manage

from ..accounts.console_helpers import *  # noqa: F403  (fixtures)
from ..accounts.console_helpers import add_member, make_user
from .gateway_helpers import entitle

pytestmark = pytest.mark.django_db

CLIENT_IP = "203.0.113.7"


def metadata(event) -> dict:
    assert event.pgh_context_id is not None, "event recorded without context"
    return event.pgh_context.metadata


def change(entry: audit.AuditEntry, name: str) -> tuple:
    [found] = [(before, after) for field, before, after in entry.changes if field == name]
    return found


def test_a_console_change_is_an_event_with_actor_ip_and_before_after(client_a, owner_a, org_a):
    member = add_member(org_a, make_user("member@example.com"))
    response = client_a.post(f"/members/{member.pk}/role/", {"role": "admin"}, REMOTE_ADDR=CLIENT_IP)
    assert response.status_code == 302
    event = MembershipEvent.objects.filter(pgh_obj_id=member.pk, pgh_label="update").get()
    context = metadata(event)
    assert context["user"] == owner_a.pk and context["email"] == owner_a.email
    assert context["ip"] == CLIENT_IP and context["url"] == f"/members/{member.pk}/role/"
    [entry] = [e for e in audit.organization_events(org_a) if e.action == "update" and e.object_id == member.pk]
    assert change(entry, "role") == (Role.MEMBER, Role.ADMIN)
    assert entry.actor == owner_a.email and entry.ip == CLIENT_IP
    # Only the field that changed is listed for an update.
    assert [name for name, _, _ in entry.changes] == ["role"]


def test_the_context_middleware_stays_out_of_the_gateways_path(rf):
    """Under /v1/ no pghistory context is entered (no SQL is prefixed); on a console path it is."""
    from pghistory import runtime

    seen = {}

    def view(request):
        seen[request.path] = getattr(runtime._tracker, "value", None)
        return None

    middleware = audit.AuditContextMiddleware(view)
    for path in ("/v1/chat/completions", "/keys/"):
        request = rf.post(path, REMOTE_ADDR=CLIENT_IP)
        request.user = AnonymousUser()
        middleware(request)
    assert seen["/v1/chat/completions"] is None
    assert seen["/keys/"].metadata["ip"] == CLIENT_IP


def test_an_admin_change_is_an_event_with_the_staff_member_and_ip(client, org_a):
    staff = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(staff)
    key, _ = APIKey.objects.create_key(org_a, "to revoke")
    response = client.post(
        "/admin/accounts/apikey/", {"action": "revoke", "_selected_action": [key.pk]}, REMOTE_ADDR=CLIENT_IP
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    event = APIKeyEvent.objects.filter(pgh_obj_id=key.pk, pgh_label="update").get()
    context = metadata(event)
    assert (context["user"], context["ip"], context["url"]) == (staff.pk, CLIENT_IP, "/admin/accounts/apikey/")
    [entry] = audit.entries(APIKeyEvent.objects.filter(pk=event.pk), APIKeyEvent)
    assert change(entry, "revoked_at") == (None, key.revoked_at)


def test_an_admin_change_to_a_model_and_its_deployment_is_audited(client):
    staff = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(staff)
    model = AIModel.objects.create(name="m1", context_length=2048)
    deployment = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9", internal_token="tok-secret-1")
    # The form as the admin would post it back (every field of the model, whatever fields it gains).
    data = {name: value for name, value in model_to_dict(model, exclude=["organizations"]).items() if value is not None and value is not False}
    data.update(display_name="Model one", context_length="4096", enabled="on")
    data.update({
        "deployments-TOTAL_FORMS": "1", "deployments-INITIAL_FORMS": "1", "deployments-MIN_NUM_FORMS": "0",
        "deployments-MAX_NUM_FORMS": "1000", "deployments-0-id": str(deployment.pk), "deployments-0-model": str(model.pk),
        "deployments-0-base_url": "http://127.0.0.1:9", "deployments-0-served_model_name": "",
        "deployments-0-internal_token": "", "deployments-0-kind": "engine", "deployments-0-weight": "1",
        "deployments-0-enabled": "on",
        "fallback_links-TOTAL_FORMS": "0", "fallback_links-INITIAL_FORMS": "0", "fallback_links-MIN_NUM_FORMS": "0",
        "fallback_links-MAX_NUM_FORMS": "1000",
    })
    response = client.post(f"/admin/inference/aimodel/{model.pk}/change/", data, REMOTE_ADDR=CLIENT_IP)
    assert response.status_code == 302, response.context["adminform"].form.errors
    event = AIModelEvent.objects.filter(pgh_obj_id=model.pk, pgh_label="update").get()
    assert metadata(event)["ip"] == CLIENT_IP and metadata(event)["user"] == staff.pk
    [entry] = audit.entries(AIModelEvent.objects.filter(pk=event.pk), AIModelEvent)
    assert change(entry, "context_length") == (2048, 4096)
    assert change(entry, "display_name") == ("", "Model one")


def test_a_management_command_is_an_event_with_the_command_and_os_user(org_a, capsys):
    call_command("create_api_key", "--org", org_a.slug, "--name", "ops key")
    key = APIKey.objects.for_org(org_a).get(name="ops key")
    event = APIKeyEvent.objects.filter(pgh_obj_id=key.pk, pgh_label="insert").get()
    context = metadata(event)
    assert context["command"] == "create_api_key" and context["os_user"] == getpass.getuser()
    assert "ip" not in context
    [entry] = audit.entries(APIKeyEvent.objects.filter(pk=event.pk), APIKeyEvent)
    assert entry.actor == f"command create_api_key ({getpass.getuser()})"
    assert change(entry, "name") == (None, "ops key")


def test_gateway_metering_writes_no_audit_row(org_a):
    """Reservation, settlement and the key's last-used time: the SQL every /v1 request runs
    (tests/inference/test_gateway_audit.py sends a real request through the gateway process)."""
    entitlement = entitle(org_a)
    key, raw = APIKey.objects.create_key(org_a, "busy key")
    before = (EntitlementEvent.objects.count(), APIKeyEvent.objects.count())
    caller = quotas.admit(raw)
    hold = quotas.reserve([entitlement], 100, "req_audit_1")
    record = UsageRecord(
        organization=org_a, api_key=key, model_name="m", endpoint="chat", status=UsageStatus.OK, http_status=200,
        latency_ms=1.0, request_id="req_audit_1", prompt_tokens=10, completion_tokens=5,
    )
    quotas.settle(hold, 15, record, caller.api_key)
    entitlement.refresh_from_db()
    key.refresh_from_db()
    assert entitlement.tokens_used == 15 and key.last_used_at is not None  # the counters did move
    assert (EntitlementEvent.objects.count(), APIKeyEvent.objects.count()) == before


def test_revoking_an_entitlement_is_an_event_but_its_counters_are_not_in_it(org_a):
    entitlement = entitle(org_a)
    entitlement.revoked_at = entitlement.created_at
    entitlement.save()
    event = EntitlementEvent.objects.filter(pgh_obj_id=entitlement.pk, pgh_label="update").get()
    names = {f.name for f in EntitlementEvent._meta.fields}
    assert "tokens_used" not in names and "tokens_reserved" not in names
    assert event.revoked_at == entitlement.revoked_at


def test_secrets_are_never_in_the_log_but_their_change_is_an_event(org_a):
    model = AIModel.objects.create(name="m2")
    deployment = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9", internal_token="tok-secret-1")
    deployment.internal_token = "tok-secret-2"
    deployment.save()
    assert DeploymentEvent.objects.filter(pgh_obj_id=deployment.pk, pgh_label="update").count() == 1
    for event_model, secret in ((DeploymentEvent, "internal_token"), (APIKeyEvent, "secret_hash"), (UserEvent, "password")):
        assert secret not in {f.name for f in event_model._meta.fields}, event_model
    # Health checks (state, not configuration) record nothing.
    Deployment.objects.filter(pk=deployment.pk).update(healthy=False, last_error="down")
    assert DeploymentEvent.objects.filter(pgh_obj_id=deployment.pk, pgh_label="update").count() == 1


def test_events_cannot_be_edited_or_deleted(org_a, owner_a):
    event = MembershipEvent.objects.filter(organization=org_a).first()
    assert event is not None
    with pytest.raises(DatabaseError), transaction.atomic():
        MembershipEvent.objects.filter(pk=event.pk).update(role=Role.MEMBER)
    with pytest.raises(DatabaseError), transaction.atomic():
        MembershipEvent.objects.filter(pk=event.pk).delete()
    assert MembershipEvent.objects.filter(pk=event.pk, role=Role.OWNER).exists()


def test_deleting_an_organization_keeps_its_history_and_records_the_deletes(org_a):
    key, _ = APIKey.objects.create_key(org_a, "doomed key")
    org_pk = org_a.pk
    org_a.delete()  # cascades to memberships, keys, entitlements
    assert set(OrganizationEvent.objects.filter(pgh_obj_id=org_pk).values_list("pgh_label", flat=True)) == {"insert", "delete"}
    assert set(APIKeyEvent.objects.filter(pgh_obj_id=key.pk).values_list("pgh_label", flat=True)) == {"insert", "delete"}
    assert MembershipEvent.objects.filter(organization_id=org_pk, pgh_label="delete").count() == 1


def test_staff_see_every_organizations_events_in_the_admin_read_only(client, org_a, org_b):
    staff = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(staff)
    listing = client.get("/admin/pghistory/middlewareevents/", {"event_model": "accounts.OrganizationEvent"})
    assert listing.status_code == 200
    body = listing.content.decode()
    # An event's admin URL names its event model and event id.
    inserts = {org.pk: OrganizationEvent.objects.get(pgh_obj_id=org.pk, pgh_label="insert").pgh_id for org in (org_a, org_b)}
    for event_id in inserts.values():
        assert f"/admin/pghistory/middlewareevents/accounts.OrganizationEvent_3A{event_id}/change/" in body
    assert "accounts.MembershipEvent_3A" not in body  # the event-model filter applied
    assert "/admin/pghistory/middlewareevents/add/" not in body and "delete_selected" not in body
    assert client.get("/admin/pghistory/middlewareevents/add/").status_code == 403
    detail = client.get(f"/admin/pghistory/middlewareevents/accounts.OrganizationEvent_3A{inserts[org_a.pk]}/change/")
    assert detail.status_code == 200 and 'name="_save"' not in detail.content.decode()
    deleting = client.post(f"/admin/pghistory/middlewareevents/accounts.OrganizationEvent_3A{inserts[org_a.pk]}/delete/", {"post": "yes"})
    assert deleting.status_code == 403


def test_owner_sees_the_audit_page_members_and_admins_do_not(client, owner_a, org_a):
    member = add_member(org_a, make_user("member@example.com"))
    admin = add_member(org_a, make_user("admin@example.com"), Role.ADMIN)
    client.force_login(owner_a)
    page = client.get("/organization/audit/")
    assert page.status_code == 200 and owner_a.email in page.content.decode()
    for membership in (member, admin):
        client.force_login(membership.user)
        assert client.get("/organization/audit/").status_code == 403
    assert Membership.objects.filter(organization=org_a).count() == 3


def test_sqlite_applies_the_migrations_and_records_nothing(tmp_path):
    """`make run` is SQLite: the event tables are created, pghistory's triggers and context are skipped."""
    manage = sqlite_manage(tmp_path, timeout=180)

    manage("migrate", "--noinput")
    assert "Created organization" in manage("create_org", "acme", "--owner", "a@example.com")
    counted = manage("shell", "-c", "from accounts.models import *; print(Organization.objects.count(), OrganizationEvent.objects.count())")
    assert counted.strip().splitlines()[-1].split() == ["1", "0"]
