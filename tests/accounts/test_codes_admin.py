"""Django admin for codes and entitlements, driven through the test client as a superuser."""

from __future__ import annotations

import base64
import csv
import io
import re

import pytest
from django.urls import reverse
from django.utils import timezone

from accounts import codes
from accounts.models import AuthorizationCode, Entitlement, User, keyed_hash

from .codes_fixtures import *  # noqa: F403  (fixtures)
from .codes_fixtures import issue_one, make_member

pytestmark = pytest.mark.django_db

GENERATE = "/admin/accounts/authorizationcode/generate/"
CODES = "/admin/accounts/authorizationcode/"
ENTITLEMENTS = "/admin/accounts/entitlement/"


@pytest.fixture
def admin_client(client):
    admin = User.objects.create_superuser("root@example.com", "pw-not-used-123")
    client.force_login(admin)
    client.admin = admin
    return client


def generate(client, **extra):
    data = {"count": "3", "token_quota": "1000", "validity_days": "30", "model_names": "smollm2",
            "max_redemptions": "2", "expires_on": "", "note": "batch for acme"}
    data.update(extra)
    return client.post(GENERATE, data)


def test_generate_page_shows_batch_once_with_csv(admin_client):
    assert reverse("admin:accounts_authorizationcode_generate") == GENERATE
    assert f'href="{GENERATE}"' in admin_client.get(CODES).content.decode()  # the changelist's button
    assert admin_client.get(GENERATE).status_code == 200
    response = generate(admin_client)
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    page = response.content.decode()
    shown = re.findall(r"mac-[0-9a-f]{8}-[a-z2-7]{26}", page)
    assert len(set(shown)) == 3
    rows = AuthorizationCode.objects.all()
    assert {r.code_hash for r in rows} == {keyed_hash(raw) for raw in set(shown)}
    assert all(r.created_by == admin_client.admin and r.note == "batch for acme" for r in rows)
    # The CSV link carries the same batch, not stored anywhere.
    uri = re.search(r'href="data:text/csv;charset=utf-8;base64,([^"]+)"', page).group(1)
    table = list(csv.DictReader(io.StringIO(base64.b64decode(uri).decode())))
    assert {row["code"] for row in table} == set(shown)
    assert all(row["token_quota"] == "1000" and row["models"] == "smollm2" for row in table)
    # Afterwards the codes are never shown again: list and change pages show only prefixes.
    listing = admin_client.get(CODES).content.decode()
    change = admin_client.get(f"{CODES}{rows[0].pk}/change/").content.decode()
    for raw in shown:
        assert raw not in listing and raw not in change
    assert rows[0].prefix in listing


def test_generate_and_download_csv(admin_client):
    response = generate(admin_client, count="2", _csv="1")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment;" in response["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(response.content.decode())))
    assert len(table) == 2
    for row in table:
        assert codes.find_code(row["code"]) is not None
    user, org = make_member("u@example.com", "csv-org")
    assert codes.redeem(org, table[0]["code"], user).token_quota == 1000


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ({"count": "0"}, "count", "greater than or equal to 1"),
        ({"count": "abc"}, "count", "Enter a whole number"),
        ({"token_quota": "0"}, "token_quota", "greater than or equal to 1"),
        ({"expires_on": "2001-01-01"}, "expires_on", "today or later"),
        ({"model_names": "bad name"}, "model_names", "not a valid model name"),
        ({"max_redemptions": ""}, "max_redemptions", "This field is required"),
    ],
)
def test_generate_page_bad_input(admin_client, extra, field, message):
    response = generate(admin_client, **extra)
    assert response.status_code == 200
    assert message in " ".join(response.context["form"].errors[field])
    assert not AuthorizationCode.objects.exists()


def test_add_button_leads_to_generator_and_non_staff_are_refused(admin_client, client, alice):
    response = admin_client.get(f"{CODES}add/")
    assert response.status_code == 302 and response["Location"] == GENERATE
    client.force_login(alice[0])
    response = client.post(GENERATE, {"count": "1", "max_redemptions": "1"})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert not AuthorizationCode.objects.exists()


def test_hash_and_prefix_are_read_only(admin_client):
    code = codes.issue_codes(1, max_redemptions=2)[0].code
    response = admin_client.post(
        f"{CODES}{code.pk}/change/",
        {"code_hash": "0" * 64, "prefix": "mac-00000000", "max_redemptions": "3", "expires_at_0": "", "expires_at_1": "",
         "note": "edited", "entitlements-TOTAL_FORMS": "0", "entitlements-INITIAL_FORMS": "0"},
    )
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else response
    fresh = AuthorizationCode.objects.get()
    assert (fresh.code_hash, fresh.prefix) == (code.code_hash, code.prefix)
    assert (fresh.max_redemptions, fresh.note) == (3, "edited")


def test_cannot_lower_max_redemptions_below_count(admin_client, alice):
    raw = issue_one(max_redemptions=2)
    codes.redeem(alice[1], raw, alice[0])
    bob_user, bob_org = make_member("b2@example.com", "b2")
    codes.redeem(bob_org, raw, bob_user)
    code = AuthorizationCode.objects.get()
    response = admin_client.post(
        f"{CODES}{code.pk}/change/",
        {"max_redemptions": "1", "expires_at_0": "", "expires_at_1": "", "note": "",
         "entitlements-TOTAL_FORMS": "2", "entitlements-INITIAL_FORMS": "2"},
    )
    assert response.status_code == 200
    assert "already redeemed 2 times" in response.content.decode()
    assert AuthorizationCode.objects.get().max_redemptions == 2


def test_revoke_code_actions(admin_client, alice):
    raw_a, raw_b = issue_one(max_redemptions=2), issue_one(max_redemptions=2)
    codes.redeem(alice[1], raw_a, alice[0])
    codes.redeem(alice[1], raw_b, alice[0])
    a, b = codes.find_code(raw_a), codes.find_code(raw_b)
    response = admin_client.post(CODES, {"action": "revoke_codes", "_selected_action": [a.pk]}, follow=True)
    assert "Revoked 1 code(s)" in response.content.decode()
    a.refresh_from_db()
    assert a.revoked_at is not None
    assert Entitlement.objects.filter(code=a, revoked_at__isnull=True).count() == 1  # kept
    response = admin_client.post(
        CODES, {"action": "revoke_codes_and_entitlements", "_selected_action": [b.pk]}, follow=True
    )
    assert "Revoked 1 code(s) and 1 entitlement(s)" in response.content.decode()
    assert Entitlement.objects.get(code=b).revoked_at is not None
    user, org = make_member("late@example.com", "late")
    with pytest.raises(codes.CodeRevoked):
        codes.redeem(org, raw_b, user)


def test_revoke_entitlement_action_takes_effect_on_next_lookup(admin_client, alice):
    entitlement = codes.redeem(alice[1], issue_one(), alice[0])
    assert Entitlement.objects.for_org(alice[1]).active().exists()
    response = admin_client.post(
        ENTITLEMENTS, {"action": "revoke_entitlements", "_selected_action": [entitlement.pk]}, follow=True
    )
    assert "Revoked 1 entitlement(s)" in response.content.decode()
    assert not Entitlement.objects.for_org(alice[1]).active().exists()


def test_codes_and_entitlements_cannot_be_deleted(admin_client, alice):
    entitlement = codes.redeem(alice[1], issue_one(), alice[0])
    assert admin_client.get(f"{CODES}{entitlement.code_id}/delete/").status_code == 403
    assert admin_client.get(f"{ENTITLEMENTS}{entitlement.pk}/delete/").status_code == 403


def test_filters_and_search(admin_client, alice, bob):
    used = issue_one()
    codes.redeem(alice[1], used, alice[0])
    revoked = issue_one()
    codes.revoke_code(codes.find_code(revoked))
    fresh = issue_one()
    issue_one(expires_at=timezone.now() + timezone.timedelta(hours=1))
    AuthorizationCode.objects.filter(expires_at__isnull=False).update(expires_at=timezone.now())

    def listed(url):
        response = admin_client.get(url)
        assert response.status_code == 200
        return {obj.pk for obj in response.context["cl"].result_list}

    assert listed(f"{CODES}?status=usable") == {codes.find_code(fresh).pk}
    assert listed(f"{CODES}?status=used_up") == {codes.find_code(used).pk}
    assert listed(f"{CODES}?status=revoked") == {codes.find_code(revoked).pk}
    assert len(listed(f"{CODES}?status=expired")) == 1
    assert listed(f"{CODES}?q={fresh[:12]}") == {codes.find_code(fresh).pk}
    assert listed(f"{CODES}?q=org-a") == {codes.find_code(used).pk}

    ent_b = codes.redeem(bob[1], issue_one(), bob[0])
    codes.revoke_entitlement(ent_b)
    assert listed(f"{ENTITLEMENTS}?status=active") == {Entitlement.objects.get(organization=alice[1]).pk}
    assert listed(f"{ENTITLEMENTS}?status=revoked") == {ent_b.pk}
    assert listed(f"{ENTITLEMENTS}?q=org-b") == {ent_b.pk}
    assert admin_client.get(f"{ENTITLEMENTS}{ent_b.pk}/change/").status_code == 200


def test_admin_can_grant_an_entitlement_without_a_code(admin_client, alice):
    response = admin_client.post(
        f"{ENTITLEMENTS}add/",
        {"organization": alice[1].pk, "token_quota": "5000", "model_names": "[]",
         "starts_at_0": "2020-01-01", "starts_at_1": "00:00:00", "ends_at_0": "", "ends_at_1": ""},
    )
    assert response.status_code == 302
    entitlement = Entitlement.objects.for_org(alice[1]).active().get()
    assert entitlement.code is None and entitlement.token_quota == 5000


def entitlement_form(org, **extra):
    data = {"organization": org.pk, "token_quota": "5000", "model_names": "[]",
            "starts_at_0": "2020-01-01", "starts_at_1": "00:00:00", "ends_at_0": "", "ends_at_1": ""}
    data.update(extra)
    return data


@pytest.mark.parametrize(
    "extra, field, message",
    [
        ({"model_names": '"smollm2"'}, "model_names", "Enter a JSON list of model names"),
        ({"model_names": "[1, 2]"}, "model_names", "Enter a JSON list of model names"),
        ({"model_names": '["bad name"]'}, "model_names", "not a valid model name"),
        ({"model_names": "not json"}, "model_names", "Enter a valid JSON"),
        ({"token_quota": "0"}, "token_quota", "positive number"),
        ({"ends_at_0": "2019-12-31", "ends_at_1": "00:00:00"}, "ends_at", "after the start"),
    ],
)
def test_entitlement_admin_form_rejects_bad_input(admin_client, alice, extra, field, message):
    response = admin_client.post(f"{ENTITLEMENTS}add/", entitlement_form(alice[1], **extra))
    assert response.status_code == 200
    assert message in " ".join(response.context["adminform"].form.errors[field])
    assert not Entitlement.objects.exists()


def test_entitlement_quota_cannot_drop_below_usage(admin_client, alice):
    entitlement = Entitlement.objects.create(organization=alice[1], token_quota=1000, tokens_used=600)
    response = admin_client.post(f"{ENTITLEMENTS}{entitlement.pk}/change/", entitlement_form(alice[1], token_quota="500"))
    assert response.status_code == 200
    assert "600 tokens are used and 0 held by requests in flight" in response.content.decode()
    entitlement.refresh_from_db()
    assert entitlement.token_quota == 1000


def test_generate_and_revoke_are_in_the_admin_history(admin_client, alice):
    from django.contrib.admin.models import ADDITION, CHANGE, LogEntry

    generate(admin_client, count="2")
    assert LogEntry.objects.filter(action_flag=ADDITION, user=admin_client.admin).count() == 2
    code = AuthorizationCode.objects.first()
    admin_client.post(CODES, {"action": "revoke_codes", "_selected_action": [code.pk]})
    entry = LogEntry.objects.get(action_flag=CHANGE, object_id=str(code.pk))
    assert entry.change_message == "Revoked" and entry.user == admin_client.admin
