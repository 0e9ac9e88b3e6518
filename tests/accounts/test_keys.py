"""API keys: console page (one-time reveal, revoke), JSON API (validation, CSRF), create_api_key command."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import APIKey, Role, keyed_hash

from .console_helpers import *  # noqa: F403  (fixtures)
from .console_helpers import add_member, make_user

pytestmark = pytest.mark.django_db


def all_column_values(key: APIKey) -> str:
    return " ".join(str(v) for v in APIKey.objects.filter(pk=key.pk).values().first().values())


# ---- console ------------------------------------------------------------------------------------


def test_console_creates_key_shows_it_once_and_stores_only_hmac(client_a, org_a, owner_a):
    response = client_a.post(
        reverse("console:keys"),
        {"name": "prod bot", "allowed_models": "m-one, m-two", "requests_per_minute": "60", "tokens_per_minute": ""},
    )
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    raw = response.context["raw_key"]
    assert raw.startswith("sk-") and raw in response.content.decode()
    key = APIKey.objects.get()
    assert (key.organization, key.created_by, key.name) == (org_a, owner_a, "prod bot")
    assert key.allowed_models == ["m-one", "m-two"] and key.requests_per_minute == 60 and key.tokens_per_minute is None
    assert key.secret_hash == keyed_hash(raw)
    secret_part = raw.rsplit("-", 1)[1]
    assert secret_part not in all_column_values(key)
    assert APIKey.objects.get_by_raw(raw) == key and key.is_usable()
    # Never shown again.
    assert raw not in client_a.get(reverse("console:keys")).content.decode()
    assert secret_part not in client_a.get(reverse("console:api-keys")).content.decode()


def test_reposting_the_create_form_makes_no_second_key(client_a):
    data = {"name": "once", "submission": "nonce-123"}
    assert client_a.post(reverse("console:keys"), data).status_code == 200
    response = client_a.post(reverse("console:keys"), data, follow=True)
    assert "already created" in response.content.decode() and not response.context.get("raw_key")
    assert APIKey.objects.count() == 1
    assert client_a.post(reverse("console:keys"), {**data, "submission": "nonce-456"}).status_code == 200
    assert APIKey.objects.count() == 2


@pytest.mark.parametrize(
    "data,error",
    [
        ({"name": ""}, "This field is required"),
        ({"name": "   "}, "This field is required"),
        ({"name": "x" * 101}, "at most 100 characters"),
        ({"name": "k", "allowed_models": "good, <bad>"}, "not a valid model name"),
        ({"name": "k", "expires_at": "2001-01-01T00:00"}, "must be in the future"),
        ({"name": "k", "expires_at": "tomorrow"}, "Enter a valid date/time"),
        ({"name": "k", "requests_per_minute": "0"}, "at least 1"),
        ({"name": "k", "tokens_per_minute": "-5"}, "greater than or equal to"),
        ({"name": "k", "tokens_per_minute": "many"}, "Enter a whole number"),
    ],
)
def test_console_key_form_errors_create_nothing(client_a, data, error):
    response = client_a.post(reverse("console:keys"), data)
    assert response.status_code == 400
    assert error in response.content.decode()
    assert "sk-" not in response.content.decode().replace("sk-…", "")
    assert not APIKey.objects.exists()


def test_console_revoke_is_immediate(client_a, org_a):
    key, raw = APIKey.objects.create_key(org_a, "to revoke")
    response = client_a.post(reverse("console:key-revoke", args=[key.pk]))
    assert response.status_code == 302
    found = APIKey.objects.get_by_raw(raw)
    assert found.revoked_at is not None and not found.is_usable() and found.status == "revoked"
    first = found.revoked_at
    client_a.post(reverse("console:key-revoke", args=[key.pk]))  # idempotent: first time kept
    assert APIKey.objects.get(pk=key.pk).revoked_at == first
    assert client_a.get(reverse("console:key-revoke", args=[key.pk])).status_code == 405


def test_member_revokes_own_keys_but_not_others(client, org_a, owner_a):
    member = make_user("dev@example.com")
    add_member(org_a, member, Role.MEMBER)
    owners_key, _ = APIKey.objects.create_key(org_a, "owner's", created_by=owner_a)
    own_key, _ = APIKey.objects.create_key(org_a, "mine", created_by=member)
    client.force_login(member)
    assert client.post(reverse("console:key-revoke", args=[owners_key.pk])).status_code == 403
    assert client.delete(reverse("console:api-key", args=[owners_key.pk])).status_code == 403
    assert client.post(reverse("console:key-revoke", args=[own_key.pk])).status_code == 302
    assert APIKey.objects.get(pk=owners_key.pk).revoked_at is None
    assert APIKey.objects.get(pk=own_key.pk).revoked_at is not None


def test_expired_key_is_listed_as_expired_and_unusable(client_a, org_a):
    key, raw = APIKey.objects.create_key(org_a, "old", expires_at=timezone.now() - timedelta(minutes=1))
    assert key.status == "expired" and not APIKey.objects.get_by_raw(raw).is_usable()
    assert '<span class="badge expired">expired</span>' in client_a.get(reverse("console:keys")).content.decode()


# ---- JSON API -----------------------------------------------------------------------------------


def test_api_create_list_and_delete(client_a, org_a, owner_a):
    expires = (timezone.now() + timedelta(days=30)).isoformat()
    response = client_a.post(
        reverse("console:api-keys"),
        {"name": " ci ", "allowed_models": ["a", "b", "a"], "tokens_per_minute": 1000, "expires_at": expires},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    body = response.json()
    raw = body["secret"]
    key = APIKey.objects.get_by_raw(raw)
    assert key.pk == body["id"] and key.name == "ci" and key.allowed_models == ["a", "b"]
    assert key.tokens_per_minute == 1000 and key.expires_at is not None and key.created_by == owner_a
    assert body["key"] == key.redacted and body["status"] == "active" and body["created_by"] == owner_a.email
    assert "secret_hash" not in body

    listed = client_a.get(reverse("console:api-keys")).json()
    assert [k["id"] for k in listed] == [key.pk]
    assert "secret" not in listed[0] and raw not in str(listed)

    response = client_a.delete(reverse("console:api-key", args=[key.pk]))
    assert response.status_code == 200 and response.json()["status"] == "revoked"
    assert not APIKey.objects.get_by_raw(raw).is_usable()


@pytest.mark.parametrize(
    "payload,param",
    [
        ({}, "name"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"name": "k", "allowed_models": "not-a-list"}, "allowed_models"),
        ({"name": "k", "allowed_models": ["ok", "bad model"]}, "allowed_models"),
        ({"name": "k", "allowed_models": [""]}, "allowed_models"),
        ({"name": "k", "allowed_models": [f"m{i}" for i in range(51)]}, "allowed_models"),
        ({"name": "k", "requests_per_minute": 0}, "requests_per_minute"),
        ({"name": "k", "requests_per_minute": "lots"}, "requests_per_minute"),
        ({"name": "k", "tokens_per_minute": -1}, "tokens_per_minute"),
        ({"name": "k", "tokens_per_minute": 2**40}, "tokens_per_minute"),
        ({"name": "k", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ({"name": "k", "expires_at": "next week"}, "expires_at"),
    ],
)
def test_api_validation_errors_are_clear_and_change_nothing(client_a, payload, param):
    response = client_a.post(reverse("console:api-keys"), payload, content_type="application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(f"{param}: ") and len(error["message"]) > len(param) + 5
    assert not APIKey.objects.exists()


def test_api_rejects_malformed_json_and_changes_nothing(client_a):
    response = client_a.post(reverse("console:api-keys"), "{not json", content_type="application/json")
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    assert not APIKey.objects.exists()


def test_api_requires_session_and_csrf(org_a, owner_a):
    anonymous = Client(enforce_csrf_checks=True)
    response = anonymous.get(reverse("console:api-keys"))
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(owner_a)
    assert browser.get(reverse("console:keys")).status_code == 200  # sets the CSRF cookie
    response = browser.post(reverse("console:api-keys"), {"name": "no-token"}, content_type="application/json")
    assert response.status_code == 403 and "CSRF" in response.json()["error"]["message"]
    assert not APIKey.objects.exists()
    key, _ = APIKey.objects.create_key(org_a, "keep")
    assert browser.delete(reverse("console:api-key", args=[key.pk])).status_code == 403
    assert APIKey.objects.get(pk=key.pk).revoked_at is None

    token = browser.cookies["csrftoken"].value
    response = browser.post(
        reverse("console:api-keys"), {"name": "with-token"}, content_type="application/json", HTTP_X_CSRFTOKEN=token
    )
    assert response.status_code == 201


def test_api_unknown_key_is_404_in_error_format(client_a):
    response = client_a.delete(reverse("console:api-key", args=[999999]))
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"


# ---- create_api_key ------------------------------------------------------------------------------


def test_create_api_key_command_prints_a_working_key(org_a, capsys):
    call_command("create_api_key", "--org", "org-a", "--name", "batch job", "--expires", "2999-01-01",
                 "--models", "a,b", "--requests-per-minute", "5")
    raw = capsys.readouterr().out.strip()
    key = APIKey.objects.get_by_raw(raw)
    assert key is not None and key.is_usable() and key.organization == org_a
    assert key.name == "batch job" and key.allowed_models == ["a", "b"] and key.requests_per_minute == 5
    assert key.expires_at.year == 2999 and key.secret_hash == keyed_hash(raw)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--org", "nope", "--name", "k"], "No organization"),
        (["--org", "org-a", "--name", "  "], "--name"),
        (["--org", "org-a", "--name", "k", "--expires", "2001-01-01"], "future"),
        (["--org", "org-a", "--name", "k", "--expires", "soon"], "is not a date"),
        (["--org", "org-a", "--name", "k", "--models", "a,<b>"], "not a valid model name"),
    ],
)
def test_create_api_key_command_errors_change_nothing(org_a, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("create_api_key", *args)
    assert not APIKey.objects.exists()
