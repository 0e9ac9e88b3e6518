"""Authorization codes: issuing, redeeming, revoking, and brute-force limiting of redemptions.

The one place these rules live; the console form, `POST /api/redeem`, the admin and the management
commands all call these functions, so every path gets the same checks and the same messages.

A code looks like `mac-1f2e3d4c-<26 base32 characters>`: the first 12 characters (`mac-1f2e3d4c`) are
stored in clear as the visible prefix used to find the row; only an HMAC of the whole code is stored
(`accounts.models.keyed_hash`), and the comparison is constant-time. Input is case-insensitive and
surrounding whitespace is ignored.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hmac
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from .forms import validate_model_names
from .models import AuthorizationCode, Entitlement, Organization, User, keyed_hash

CODE_PREFIX = "mac-"
_SECRET_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"  # base32, lower case: 5 bits a character
_SECRET_LENGTH = 26  # 130 bits
_CODE_RE = re.compile(r"^(mac-[0-9a-f]{8})-([a-z2-7]{26})$")
MAX_CODES_PER_BATCH = 10_000


# --- outcomes -----------------------------------------------------------------------------------


class RedemptionError(Exception):
    """A refused redemption. `message` is for people, `code` for programs, `http_status` for the API."""

    code = "redemption_failed"
    http_status = 400
    message = "The code could not be redeemed."

    def __init__(self, message: str | None = None):
        if message is not None:
            self.message = message
        super().__init__(self.message)


class UnknownCode(RedemptionError):
    code = "unknown_code"
    http_status = 404
    message = "This authorization code does not exist. Check that you copied it completely."


class CodeExpired(RedemptionError):
    code = "code_expired"
    http_status = 400
    message = "This authorization code has expired and can no longer be redeemed."


class CodeRevoked(RedemptionError):
    code = "code_revoked"
    http_status = 400
    message = "This authorization code has been revoked by an administrator."


class CodeUsedUp(RedemptionError):
    code = "code_used_up"
    http_status = 409
    message = "This authorization code has already been redeemed the maximum number of times."


class AlreadyRedeemed(RedemptionError):
    code = "already_redeemed"
    http_status = 409
    message = "Your organization has already redeemed this authorization code."


class NoOrganization(RedemptionError):
    code = "no_organization"
    http_status = 400
    message = "You are not a member of any organization, so there is nothing to redeem the code for."


class RedemptionRateLimited(RedemptionError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, retry_after: int):
        self.retry_after = max(1, retry_after)
        minutes = (self.retry_after + 59) // 60
        super().__init__(
            "Too many failed redemption attempts. "
            f"Try again in {minutes} minute{'s' if minutes != 1 else ''}."
        )


# --- issuing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCode:
    """A freshly made code; `raw` exists only here, never in the database."""

    code: AuthorizationCode
    raw: str


def generate_raw_code() -> str:
    public = secrets.token_hex(4)
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(_SECRET_LENGTH))
    return f"{CODE_PREFIX}{public}-{secret}"


def parse_code(raw: str) -> tuple[str, str] | None:
    """(visible prefix, normalized code) of a well-formed code, None for anything else."""
    if not isinstance(raw, str):
        return None
    normalized = raw.strip().lower()
    match = _CODE_RE.match(normalized)
    if match is None:
        return None
    return match.group(1), normalized


def clean_model_names(names: Iterable[str] | str | None) -> list[str]:
    """A de-duplicated list of model names from a list or a comma-separated string."""
    if names is None:
        return []
    if isinstance(names, str):
        names = names.split(",")
    return validate_model_names(list(names))


def issue_codes(
    count: int,
    *,
    token_quota: int | None = None,
    validity_days: int | None = None,
    model_names: Iterable[str] | str | None = None,
    max_redemptions: int = 1,
    expires_at: dt.datetime | None = None,
    note: str = "",
    created_by: User | None = None,
) -> list[IssuedCode]:
    """Create `count` codes as one batch; the raw codes are returned once and never stored."""
    errors = {}
    if not isinstance(count, int) or not 1 <= count <= MAX_CODES_PER_BATCH:
        errors["count"] = f"The number of codes must be between 1 and {MAX_CODES_PER_BATCH}."
    if token_quota is not None and token_quota < 1:
        errors["token_quota"] = "The token quota must be a positive number (leave it empty for unlimited)."
    if validity_days is not None and validity_days < 1:
        errors["validity_days"] = "The validity must be at least one day (leave it empty for no end)."
    if max_redemptions < 1:
        errors["max_redemptions"] = "A code must be redeemable at least once."
    if expires_at is not None and expires_at <= timezone.now():
        errors["expires_at"] = "The expiry date must be in the future."
    try:
        names = clean_model_names(model_names)
    except ValidationError as exc:
        errors["model_names"] = exc.messages[0]
    if errors:
        raise ValidationError(errors)

    batch = uuid.uuid4()
    with transaction.atomic():
        raws = [generate_raw_code() for _ in range(count)]
        rows = [
            AuthorizationCode(
                prefix=raw[:12],
                code_hash=keyed_hash(raw),
                batch=batch,
                token_quota=token_quota,
                validity_days=validity_days,
                model_names=names,
                max_redemptions=max_redemptions,
                expires_at=expires_at,
                note=note,
                created_by=created_by,
            )
            for raw in raws
        ]
        created = AuthorizationCode.objects.bulk_create(rows)
        return [IssuedCode(code=row, raw=raw) for row, raw in zip(created, raws, strict=True)]


def end_of_day(day: dt.date) -> dt.datetime:
    """The first instant after `day` (UTC): a code that "expires on D" is redeemable all of D."""
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time.min, tzinfo=dt.UTC)


# --- brute-force limiting -----------------------------------------------------------------------


class FailureLimiter:
    """Fixed-window counters of failed redemptions per user and per IP in the shared cache (Redis).

    An attempt takes a slot (atomic INCR) before the code is looked up, so a burst of concurrent
    guesses cannot all pass the check at once; a success gives its slot back, a failure keeps it.
    Past the limit an attempt is refused before the code is checked, and gives its slot back too,
    so refused attempts neither count nor extend the window.
    """

    def __init__(self, user: User | None, ip: str | None):
        self.keys: list[tuple[str, int]] = []
        self.window = settings.REDEEM_FAILURE_WINDOW_SECONDS
        self.taken: list[str] = []
        if user is not None and getattr(user, "pk", None) is not None:
            self.keys.append((f"redeem-fail:user:{user.pk}", settings.REDEEM_FAILURES_PER_USER))
        if ip:
            self.keys.append((f"redeem-fail:ip:{ip}", settings.REDEEM_FAILURES_PER_IP))

    def acquire(self) -> None:
        """Take a slot under every key, or raise `RedemptionRateLimited` holding none."""
        for key, limit in self.keys:
            cache.add(key, 0, timeout=self.window)  # starts the window; no-op when it exists
            try:
                count = cache.incr(key)
            except ValueError:  # the window ended between add and incr: start a new one
                cache.add(key, 0, timeout=self.window)
                count = cache.incr(key)
            self.taken.append(key)
            if count > limit:
                retry_after = self._ttl(key)
                self.release()
                raise RedemptionRateLimited(retry_after=retry_after)

    def release(self) -> None:
        """Give the slots back: the attempt was refused by the limit, or it succeeded."""
        for key in self.taken:
            with contextlib.suppress(ValueError):  # its window already ended
                cache.decr(key)
        self.taken = []

    def _ttl(self, key: str) -> int:
        """Seconds until the window of `key` ends (exact on Redis, the whole window elsewhere)."""
        client = getattr(cache, "_cache", None)
        if hasattr(client, "get_client"):  # Django's Redis backend
            seconds = client.get_client(key).ttl(cache.make_and_validate_key(key))
            if seconds and seconds > 0:
                return int(seconds)
        return self.window


# --- redeeming ----------------------------------------------------------------------------------


def find_code(raw: str) -> AuthorizationCode | None:
    """The code matching `raw` (constant-time hash comparison), or None."""
    parsed = parse_code(raw)
    if parsed is None:
        return None
    prefix, normalized = parsed
    wanted = keyed_hash(normalized)
    match = None
    for candidate in AuthorizationCode.objects.filter(prefix=prefix):
        if hmac.compare_digest(candidate.code_hash, wanted):
            match = candidate
    return match


def redeem(
    organization: Organization | None, raw_code: str, user: User | None = None, *, ip: str | None = None
) -> Entitlement:
    """Grant `organization` the entitlement of `raw_code`, or raise a `RedemptionError`.

    Any member may redeem for their organization: it only adds access. Concurrent redemptions
    serialize on the code's row lock, and the count is raised with a conditional UPDATE, so a
    code with K redemptions left yields exactly K entitlements however many requests race.
    """
    if organization is None:
        raise NoOrganization()
    limiter = FailureLimiter(user, ip)
    limiter.acquire()
    try:
        entitlement = _redeem(organization, raw_code)
    except RedemptionError:
        raise  # the slots stay taken: one more failure in this window
    except Exception:
        limiter.release()  # a server error is not the caller's failed guess
        raise
    limiter.release()
    return entitlement


def _redeem(organization: Organization, raw_code: str) -> Entitlement:
    found = find_code(raw_code)
    if found is None:
        raise UnknownCode()
    try:
        with transaction.atomic():
            code = AuthorizationCode.objects.select_for_update().get(pk=found.pk)
            now = timezone.now()
            if code.revoked_at is not None:
                raise CodeRevoked()
            if code.expires_at is not None and code.expires_at <= now:
                raise CodeExpired()
            if Entitlement.objects.for_org(organization).filter(code=code).exists():
                raise AlreadyRedeemed()
            claimed = AuthorizationCode.objects.filter(
                pk=code.pk, revoked_at__isnull=True, redemption_count__lt=F("max_redemptions")
            ).update(redemption_count=F("redemption_count") + 1)
            if claimed != 1:
                raise CodeUsedUp()
            return Entitlement.objects.create(
                organization=organization,
                code=code,
                token_quota=code.token_quota,
                model_names=list(code.model_names),
                starts_at=now,
                ends_at=now + dt.timedelta(days=code.validity_days) if code.validity_days else None,
            )
    except IntegrityError as exc:  # the (organization, code) constraint: a same-org race lost
        raise AlreadyRedeemed() from exc


# --- revoking -----------------------------------------------------------------------------------


def revoke_code(code: AuthorizationCode, *, with_entitlements: bool = False) -> int:
    """Stop further redemptions of `code`; optionally revoke what it already granted.

    Returns the number of entitlements revoked. Both take effect on the next request: the
    gateway reads entitlements from the database on every request.
    """
    now = timezone.now()
    with transaction.atomic():
        AuthorizationCode.objects.filter(pk=code.pk, revoked_at__isnull=True).update(revoked_at=now)
        revoked = 0
        if with_entitlements:
            revoked = Entitlement.objects.filter(code=code, revoked_at__isnull=True).update(revoked_at=now)
    code.refresh_from_db(fields=["revoked_at"])
    return revoked


def revoke_entitlement(entitlement: Entitlement) -> bool:
    """Revoke one entitlement; False when it was already revoked."""
    changed = Entitlement.objects.filter(pk=entitlement.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    entitlement.refresh_from_db(fields=["revoked_at"])
    return bool(changed)
