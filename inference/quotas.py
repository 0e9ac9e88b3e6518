"""Exact token quotas: reserve before forwarding, settle to the engine-reported usage afterwards.

Invariant, under any concurrency: for every entitlement with a quota,
    tokens_used + tokens_reserved <= token_quota.
A reservation is one conditional UPDATE (`... WHERE tokens_used + tokens_reserved + r <= token_quota`),
which PostgreSQL re-checks against the latest row version after waiting for the row lock, so two
requests can never both take the last tokens. Settling moves the used part from `tokens_reserved` to
`tokens_used` and releases the rest; a Reservation row with an expiry records each hold so holds of
crashed requests are released by `expire_reservations` (scheduled by Celery beat).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from accounts.models import APIKey, Entitlement
from maas import telemetry

from .catalog import CatalogEntry, Upstream, catalog
from .errors import (
    GatewayError,
    insufficient_quota,
    invalid_api_key,
    model_not_found,
    no_entitlement,
    service_unavailable,
)
from .models import Reservation, UsageRecord
from .ratelimit import Decision, RateLimiter, rate_limit_error
from .validation import InferenceRequest

ENTITLEMENTS = Entitlement._meta.db_table
RESERVATIONS = Reservation._meta.db_table
API_KEYS = APIKey._meta.db_table

logger = logging.getLogger(__name__)


@dataclass
class Caller:
    api_key: APIKey
    entitlements: list[Entitlement]  # the organization's active entitlements
    entries: dict[str, CatalogEntry]  # the catalog snapshot read with them

    def resolve(self, model_name: str) -> tuple[CatalogEntry, list[Entitlement]]:
        """The model and the entitlements that cover it, in reservation order; 404 model_not_found
        alike for unknown, invisible, outside the key's allowlist or outside every entitlement."""
        entry = self.entries.get(model_name)
        covering = [e for e in self.entitlements if e.allows_model(model_name)]
        key = self.api_key
        if (
            entry is None
            or not entry.visible_for(key.organization_id)
            or (key.allowed_models and model_name not in key.allowed_models)
            or not covering
        ):
            raise model_not_found(model_name)
        # Spend bounded grants first (soonest ending first), unlimited ones last.
        covering.sort(key=lambda e: (e.token_quota is None, e.ends_at is None, e.ends_at or e.created_at))
        return entry, covering

    def visible_models(self) -> list[CatalogEntry]:
        """The catalog entries this key may call (GET /v1/models)."""
        out = []
        for name in sorted(self.entries):
            try:
                out.append(self.resolve(name)[0])
            except GatewayError:
                continue
        return out


@dataclass
class Hold:
    reservation_id: int
    entitlement_id: int
    tokens: int


def authenticate(raw_key: str) -> APIKey:
    key = APIKey.objects.get_by_raw(raw_key)
    if key is None:
        raise invalid_api_key(f"Incorrect API key provided: {redact(raw_key)}.")
    if not key.is_usable():
        raise invalid_api_key(f"The API key {key.redacted} is {key.status if key.organization.is_active else 'disabled'}.")
    return key


def redact(raw_key: str) -> str:
    return f"{raw_key[:7]}…{raw_key[-4:]}" if len(raw_key) > 12 else "…"


def admit(raw_key: str) -> Caller:
    """Who is calling: 401 for a bad key, 403 authorization_required without an active entitlement.

    Two queries (the key with its organization, the active entitlements) plus, every few seconds,
    the catalog refresh.
    """
    key = authenticate(raw_key)
    entitlements = list(Entitlement.objects.for_org(key.organization).active())
    if not entitlements:
        raise no_entitlement()
    return Caller(key, entitlements, catalog.entries())


def reserve(entitlements: list[Entitlement], tokens: int, request_id: str) -> Hold:
    """Hold `tokens` on the first covering entitlement where they fit, or raise insufficient_quota.

    Plain SQL on the hot path: the conditional UPDATE and the Reservation row in one transaction.
    """
    expires_at = timezone.now() + timedelta(seconds=settings.GATEWAY_RESERVATION_TTL_SECONDS)
    with transaction.atomic(), connection.cursor() as cursor:
        for entitlement in entitlements:
            if entitlement.token_quota is not None and entitlement.token_quota - entitlement.tokens_used < tokens:
                continue  # cannot fit even with nothing in flight: skip the round trip
            cursor.execute(
                f"UPDATE {ENTITLEMENTS} SET tokens_reserved = tokens_reserved + %s WHERE id = %s"
                " AND revoked_at IS NULL AND (token_quota IS NULL OR tokens_used + tokens_reserved + %s <= token_quota)",
                [tokens, entitlement.pk, tokens],
            )
            if cursor.rowcount == 1:
                cursor.execute(
                    f"INSERT INTO {RESERVATIONS} (organization_id, entitlement_id, tokens, request_id, created_at, expires_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                    [entitlement.organization_id, entitlement.pk, tokens, request_id, timezone.now(), expires_at],
                )
                return Hold(cursor.fetchone()[0], entitlement.pk, tokens)
    raise insufficient_quota()


def charge_for(hold: Hold, used: int) -> int:
    """What the entitlement is charged: the exact usage, never more than was reserved."""
    if used > hold.tokens:
        logger.error("usage %d exceeded reservation %d (entitlement %d): charging the reservation",
                     used, hold.tokens, hold.entitlement_id)
    return max(0, min(used, hold.tokens))


def settle(hold: Hold | None, used: int, record: UsageRecord | None, touch_key: APIKey | None = None) -> None:
    """Charge `used` tokens, release the rest of the hold and write the usage record, in one transaction."""
    with transaction.atomic(), connection.cursor() as cursor:
        if hold is not None:
            charge = charge_for(hold, used)
            cursor.execute(f"DELETE FROM {RESERVATIONS} WHERE id = %s", [hold.reservation_id])
            if cursor.rowcount:
                cursor.execute(
                    f"UPDATE {ENTITLEMENTS} SET tokens_reserved = tokens_reserved - %s, tokens_used = tokens_used + %s"
                    " WHERE id = %s",
                    [hold.tokens, charge, hold.entitlement_id],
                )
            elif charge:
                # The hold already expired and was released: charge only what still fits.
                cursor.execute(
                    f"UPDATE {ENTITLEMENTS} SET tokens_used = tokens_used + CASE"
                    " WHEN token_quota IS NULL OR token_quota - tokens_used - tokens_reserved >= %s THEN %s"
                    " WHEN token_quota - tokens_used - tokens_reserved > 0 THEN token_quota - tokens_used - tokens_reserved"
                    " ELSE 0 END WHERE id = %s",
                    [charge, charge, hold.entitlement_id],
                )
        if record is not None:
            record.save(force_insert=True)
        if touch_key is not None:
            now = timezone.now()
            if touch_key.last_used_at is None or now - touch_key.last_used_at > timedelta(minutes=1):
                cursor.execute(f"UPDATE {API_KEYS} SET last_used_at = %s WHERE id = %s", [now, touch_key.pk])


@dataclass
class Admission:
    """An admitted request: who, which model and replica, its rate-limit decision and token hold."""

    caller: Caller
    entry: CatalogEntry
    upstream: Upstream
    decision: Decision
    hold: Hold


def admit_request(
    raw_key: str, inference: InferenceRequest | None, invalid: GatewayError | None, request_id: str, limiter: RateLimiter,
    labels: dict | None = None,
) -> Admission:
    """Everything before forwarding, in one worker-thread hop: key (401), entitlement (403), then the
    body's validation error if any (400), model (404), replica (503), rate limits (429
    rate_limit_exceeded) and the token hold (429 insufficient_quota). `labels` receives the organization
    and model for the gateway's metrics as soon as they are known, refusals included."""
    with telemetry.span("gateway.auth"):
        caller = admit(raw_key)
    if labels is not None:
        labels["organization"] = caller.api_key.organization.slug
    if invalid is not None or inference is None:
        raise invalid or GatewayError(400, "Invalid request.")
    entry, entitlements = caller.resolve(inference.model)
    if labels is not None:
        labels["model"] = entry.model.name
    upstream = catalog.pick(entry)
    if upstream is None:
        raise service_unavailable(f"The model `{inference.model}` is temporarily unavailable: no healthy replica. Please retry.")
    key = caller.api_key
    tokens = inference.reservation(entry.model.context_length, settings.GATEWAY_PROMPT_OVERHEAD_TOKENS)
    decision = limiter.acquire(key, key.organization, tokens)
    if not decision.allowed:
        raise rate_limit_error(decision)
    try:
        with telemetry.span("gateway.quota_reservation", {"maas.reserved_tokens": tokens}):
            hold = reserve(entitlements, tokens, request_id)
    except GatewayError as exc:
        limiter.release(decision)
        exc.headers = {**decision.headers, **exc.headers}
        raise
    except BaseException:
        limiter.release(decision)
        raise
    return Admission(caller, entry, upstream, decision, hold)


def expire_reservations(now=None) -> int:
    """Release holds whose request never settled (crashed worker); returns how many were released."""
    now = now or timezone.now()
    released = 0
    for reservation_id in Reservation.objects.filter(expires_at__lte=now).values_list("pk", flat=True):
        with transaction.atomic():
            reservation = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
            if reservation is None:
                continue  # settled meanwhile
            Entitlement.objects.filter(pk=reservation.entitlement_id).update(
                tokens_reserved=F("tokens_reserved") - reservation.tokens
            )
            reservation.delete()
            released += 1
    if released:
        logger.warning("released %d expired token reservations", released)
    return released
