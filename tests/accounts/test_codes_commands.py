"""`issue_codes` and `redeem_code`: output, the same checks as the console, clear CommandErrors."""

from __future__ import annotations

import datetime as dt
import io

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts import codes
from accounts.models import AuthorizationCode, Entitlement, keyed_hash

from .codes_fixtures import *  # noqa: F403  (fixtures)
from .codes_fixtures import issue_one, make_member

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_issue_codes_prints_one_code_per_line_and_stores_hashes():
    tomorrow = (timezone.now() + dt.timedelta(days=1)).date()
    out = run(
        "issue_codes", "--count", "4", "--tokens", "100000", "--days", "30", "--models", "smollm2,other",
        "--max-redemptions", "2", "--expires", tomorrow.isoformat(), "--note", "pilot",
    )
    lines = out.splitlines()
    assert len(lines) == 4 and len(set(lines)) == 4
    assert all(codes.parse_code(line) for line in lines)
    rows = AuthorizationCode.objects.all()
    assert {row.code_hash for row in rows} == {keyed_hash(line) for line in lines}
    assert len({row.batch for row in rows}) == 1
    row = rows[0]
    assert (row.token_quota, row.validity_days, row.model_names, row.max_redemptions, row.note) == (
        100000, 30, ["smollm2", "other"], 2, "pilot"
    )
    assert row.expires_at == codes.end_of_day(tomorrow)


def test_issue_codes_defaults_unlimited_single_use():
    (line,) = run("issue_codes", "--count", "1").splitlines()
    row = AuthorizationCode.objects.get()
    assert row.prefix == line[:12]
    assert (row.token_quota, row.validity_days, row.model_names, row.max_redemptions, row.expires_at) == (
        None, None, [], 1, None
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--count", "0"], "--count: Ensure this value is greater than or equal to 1."),
        (["--count", "many"], "--count: Enter a whole number."),
        (["--count", "1", "--tokens", "-5"], "--tokens: Ensure this value is greater than or equal to 1."),
        (["--count", "1", "--days", "0"], "--days: Ensure this value is greater than or equal to 1."),
        (["--count", "1", "--max-redemptions", "0"], "--max-redemptions: Ensure this value is greater than or equal to 1."),
        (["--count", "1", "--expires", "2020-01-01"], "--expires: The expiry date must be today or later."),
        (["--count", "1", "--expires", "31/12/2030"], "--expires: Enter a valid date."),
        (["--count", "1", "--models", "ok,not ok"], "--models: 'not ok' is not a valid model name (letters, digits and . _ : / @ + -, at most 128 characters)."),
    ],
)
def test_issue_codes_bad_options(args, message):
    with pytest.raises(CommandError) as info:
        run("issue_codes", *args)
    assert message in str(info.value)
    assert not AuthorizationCode.objects.exists()


def test_issue_codes_requires_count():
    with pytest.raises(CommandError, match="--count"):
        run("issue_codes")


def test_redeem_code_command(db):
    _, org = make_member("ops@example.com", "ops-org")
    raw = issue_one(token_quota=777, model_names=["smollm2"])
    out = run("redeem_code", "--org", "ops-org", raw)
    entitlement = Entitlement.objects.get()
    assert entitlement.organization == org
    assert f"entitlement #{entitlement.pk}" in out and "777 tokens" in out and "smollm2" in out


def test_redeem_code_command_errors(db):
    make_member("ops@example.com", "ops-org")
    raw = issue_one()
    with pytest.raises(CommandError, match="No organization with the slug “nope”"):
        run("redeem_code", "--org", "nope", raw)
    with pytest.raises(CommandError, match="does not exist"):
        run("redeem_code", "--org", "ops-org", "mac-deadbeef-" + "a" * 26)
    run("redeem_code", "--org", "ops-org", raw)
    with pytest.raises(CommandError, match="already redeemed"):
        run("redeem_code", "--org", "ops-org", raw)
    make_member("x@example.com", "second")
    with pytest.raises(CommandError, match="maximum number of times"):
        run("redeem_code", "--org", "second", raw)
    codes.revoke_code(AuthorizationCode.objects.get())
    with pytest.raises(CommandError, match="revoked"):
        run("redeem_code", "--org", "second", raw)
    assert Entitlement.objects.count() == 1
