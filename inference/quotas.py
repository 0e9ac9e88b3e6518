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

import asyncio
import collections
import contextlib
import functools
import hmac
import logging
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal

import psycopg
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from accounts.models import APIKey, Entitlement, Membership, Organization, keyed_hash
from maas import telemetry

from . import pgasync, prompt_count, routing
from .catalog import CatalogEntry, Upstream, catalog
from .dbthreads import in_worker_thread
from .errors import (
    GatewayError,
    insufficient_budget,
    insufficient_quota,
    invalid_api_key,
    model_not_found,
    no_entitlement,
    quota_in_flight,
    service_unavailable,
)
from .models import AIModel, Budget, Reservation, UsageRecord, UsageSource
from .ratelimit import Decision, RateLimiter, rate_limit_error
from .validation import InferenceRequest

ENTITLEMENTS = Entitlement._meta.db_table
RESERVATIONS = Reservation._meta.db_table
API_KEYS = APIKey._meta.db_table
USAGE = UsageRecord._meta.db_table
BUDGETS = Budget._meta.db_table

logger = logging.getLogger(__name__)


@dataclass
class Caller:
    """Who is calling: an API key, or (the playground) a console user's session for their current
    organization. Both take the same path from here on; `source` marks the usage record."""

    api_key: APIKey | None
    entitlements: list[Entitlement]  # the organization's active entitlements
    entries: dict[str, CatalogEntry]  # the catalog snapshot read with them
    organization: Organization | None = None  # the key's organization when None
    user_id: int | None = None  # the key's creator when None
    source: str = UsageSource.API
    budgets: list[Budget] = field(default_factory=list)  # the key's budget, then the organization's, if set

    def __post_init__(self) -> None:
        if self.organization is None:
            self.organization = self.api_key.organization
        if self.user_id is None and self.api_key is not None:
            self.user_id = self.api_key.created_by_id

    def resolve(self, model_name: str) -> tuple[CatalogEntry, list[Entitlement]]:
        """The model and the entitlements that cover it, in reservation order; 404 model_not_found
        alike for unknown, invisible, outside the key's allowlist or outside every entitlement."""
        entry = self.entries.get(model_name)
        covering = [e for e in self.entitlements if e.allows_model(model_name)]
        key = self.api_key
        if (
            entry is None
            or not entry.visible_for(self.organization.pk)
            or (key is not None and key.allowed_models and model_name not in key.allowed_models)
            or not covering
        ):
            raise model_not_found(model_name)
        # Spend bounded grants first (soonest ending first), unlimited ones last.
        covering.sort(key=lambda e: (e.token_quota is None, e.ends_at is None, e.ends_at or e.created_at))
        return entry, covering

    def visible_models(self) -> list[CatalogEntry]:
        """The catalog entries this caller may call (GET /v1/models, the console's models page)."""
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
    cost: Decimal = Decimal(0)  # the worst-case cost held on `budget_ids`
    budget_ids: tuple[int, ...] = ()


def _converters(model) -> list[tuple]:
    """Per concrete field of `model`: its attname and the converters Django's compiler applies to a raw
    column value (the backend's, e.g. SQLite's aware datetimes, then the field's, e.g. JSON decoding)."""
    out = []
    for f in model._meta.concrete_fields:
        col = f.get_col(model._meta.db_table)
        out.append((f.attname, connection.ops.get_db_converters(col) + col.get_db_converters(connection), col))
    return out


@functools.cache
def _columns(model) -> tuple[list[str], list[list], list]:
    names, converters, cols = zip(*_converters(model), strict=True)
    return list(names), list(converters), list(cols)


def instance_from(model, values) -> object:
    """A model instance from its columns as a raw cursor returned them, as the ORM would build it."""
    names, converters, cols = _columns(model)
    converted = []
    for value, convert, col in zip(values, converters, cols, strict=True):
        for converter in convert:
            value = converter(value, col, connection)
        converted.append(value)
    return model.from_db(DEFAULT_DB_ALIAS, names, converted)


def select_list(alias: str, model) -> str:
    return ", ".join(f"{alias}.{connection.ops.quote_name(f.column)}" for f in model._meta.concrete_fields)


@functools.cache
def admit_sql() -> str:
    """The key, its organization and the organization's active entitlements (the rule of
    EntitlementQuerySet.active, which test_quotas checks this against) in one round trip; every
    concrete column of the three, in model order."""
    return (
        f"SELECT {select_list('k', APIKey)}, {select_list('o', Organization)}, {select_list('kb', Budget)},"
        f" {select_list('ob', Budget)}, {select_list('e', Entitlement)}"
        f" FROM {API_KEYS} k JOIN {Organization._meta.db_table} o ON o.id = k.organization_id"
        f" LEFT JOIN {BUDGETS} kb ON kb.api_key_id = k.id"
        f" LEFT JOIN {BUDGETS} ob ON ob.organization_id = o.id AND ob.api_key_id IS NULL"
        f" LEFT JOIN {ENTITLEMENTS} e ON e.organization_id = o.id AND e.revoked_at IS NULL AND e.starts_at <= %s"
        " AND (e.ends_at IS NULL OR e.ends_at > %s)"
        " WHERE k.public_id = %s"
    )


def caller_from_rows(rows: list[tuple]) -> tuple[APIKey, list[Entitlement], list[Budget]] | None:
    if not rows:
        return None
    row = rows[0]
    nk, no, nb = (len(m._meta.concrete_fields) for m in (APIKey, Organization, Budget))
    key = instance_from(APIKey, row[:nk])
    key.organization = instance_from(Organization, row[nk:nk + no])
    start = nk + no
    budgets = [instance_from(Budget, row[at:at + nb]) for at in (start, start + nb) if row[at] is not None]
    start += 2 * nb
    entitlements = [instance_from(Entitlement, r[start:]) for r in rows if r[start] is not None]
    return key, entitlements, budgets


def redact(raw_key: str) -> str:
    return f"{raw_key[:7]}…{raw_key[-4:]}" if len(raw_key) > 12 else "…"


def _admit_steps(raw_key: str):
    public_id = APIKey.parse_public_id(raw_key)
    now = timezone.now()
    rows = (yield [(admit_sql(), [now, now, public_id])]) if public_id else []
    return caller_from_rows(rows), now


def admit(raw_key: str) -> Caller:
    """Who is calling: 401 for a bad key, 403 authorization_required without an active entitlement.

    One query (key, organization and active entitlements) plus, every few seconds, the catalog refresh.
    """
    found, now = run(_admit_steps(raw_key))
    return check_caller(raw_key, found, now, catalog.entries())


async def admit_async(raw_key: str) -> Caller:
    """`admit` on the event loop."""
    found, now = await run_async(_admit_steps(raw_key))
    entries = catalog.cached_entries()
    if entries is None:
        entries = await sync_to_async(refresh_catalog, thread_sensitive=False)()
    return check_caller(raw_key, found, now, entries)


def refresh_catalog() -> dict:
    try:
        return catalog.entries()
    finally:
        connection.close()


def check_caller(raw_key: str, found, now, entries) -> Caller:
    if found is None or not hmac.compare_digest(found[0].secret_hash, keyed_hash(raw_key)):
        raise invalid_api_key(f"Incorrect API key provided: {redact(raw_key)}.")
    key, entitlements, budgets = found
    if not key.is_usable(now):
        raise invalid_api_key(f"The API key {key.redacted} is {key.status if key.organization.is_active else 'disabled'}.")
    if not entitlements:
        raise no_entitlement()
    return Caller(key, entitlements, entries, budgets=budgets)


@dataclass(frozen=True)
class SessionCredential:
    """The second kind of credential: a console user's login session, acting for their current
    organization (the playground). The view has already checked the session and its CSRF token."""

    user_id: int
    organization_id: int


def organization_caller(organization: Organization, user_id: int | None,
                        entries: dict[str, CatalogEntry] | None = None) -> Caller:
    """A caller for a whole organization, without a key (the console's view of the catalog)."""
    entitlements = list(Entitlement.objects.for_org(organization).active())
    budgets = list(Budget.objects.for_org(organization).filter(api_key__isnull=True))
    return Caller(None, entitlements, catalog.entries() if entries is None else entries, organization, user_id,
                  UsageSource.PLAYGROUND, budgets)


def admit_session(credential: SessionCredential) -> Caller:
    """`admit` for a session: 401 when the membership or the user is gone, 403 when the organization
    is disabled or has no active entitlement."""
    membership = (
        Membership.objects.select_related("organization", "user")
        .filter(user_id=credential.user_id, organization_id=credential.organization_id).first()
    )
    if membership is None or not membership.user.is_active:
        raise GatewayError(401, "Your console session is no longer valid for this organization. Log in again.",
                           code="invalid_session")
    if not membership.organization.is_active:
        raise GatewayError(403, "This organization is disabled.", "permission_denied", "organization_disabled")
    caller = organization_caller(membership.organization, credential.user_id)
    if not caller.entitlements:
        raise no_entitlement()
    return caller


def admit_session_and_close(credential: SessionCredential) -> Caller:
    try:
        return admit_session(credential)
    finally:
        connection.close()


@dataclass(frozen=True)
class KeyCredential:
    """The third kind: an API key by its id, for work done later on the key's behalf (a batch's lines,
    inference/batch_runner.py). The key authenticated when the work was submitted; each line is
    admitted again as that key (revoked, expired, disabled organization, allowlist, entitlements)."""

    api_key_id: int
    source: str = UsageSource.BATCH


def admit_key(credential: KeyCredential) -> Caller:
    """`admit` without the secret: 401 when the key is no longer usable, 403 without an entitlement."""
    key = APIKey.objects.select_related("organization").filter(pk=credential.api_key_id).first()
    now = timezone.now()
    if key is None or not key.is_usable(now):
        raise invalid_api_key("The API key that submitted this work is no longer usable.")
    entitlements = list(Entitlement.objects.for_org(key.organization).active(now))
    if not entitlements:
        raise no_entitlement()
    return Caller(key, entitlements, catalog.entries(), source=credential.source, budgets=budgets_of(key))


def budgets_of(key: APIKey) -> list[Budget]:
    """The key's budget, then its organization's (the order holds take them in)."""
    budgets = Budget.objects.filter(Q(api_key=key) | Q(organization_id=key.organization_id, api_key__isnull=True))
    return sorted(budgets, key=lambda b: b.api_key_id is None)


def admit_credential(credential: str | SessionCredential | KeyCredential) -> Caller:
    if isinstance(credential, KeyCredential):
        return admit_key(credential)
    return admit_session(credential) if isinstance(credential, SessionCredential) else admit(credential)


async def admit_credential_async(credential: str | SessionCredential) -> Caller:
    if isinstance(credential, SessionCredential):
        return await sync_to_async(admit_session_and_close, thread_sensitive=False)(credential)
    return await admit_async(credential)


# The money path, once: each operation (admission query, hold, settlement, extension) is a generator of
# steps, a list of statements run in one transaction (the rows of the last are sent back) or a Wait; `run`
# drives it on Django's connection (SQLite for `make run`, PostgreSQL for tests and tasks), `run_async` on
# the event loop's asyncio pool on PostgreSQL (one statement per step), else `run` in a database thread.
# Only the text of a hold and a settlement differs by vendor: one statement on PostgreSQL (one round trip),
# a short transaction on SQLite (no DML in a WITH).

Statement = tuple[str, list]


@dataclass(frozen=True)
class Wait:
    """A step that pauses (the quota's room is held by requests in flight)."""

    seconds: float


def run(steps: Generator):
    """Drive `steps` on Django's connection of this thread; returns what the generator returns."""
    result = None
    while True:
        try:
            step = steps.send(result)
        except StopIteration as stop:
            return stop.value
        if isinstance(step, Wait):
            time.sleep(step.seconds)
            result = None
        else:
            result = execute(step)


def execute(statements: list[Statement]) -> list[tuple]:
    with transaction.atomic() if len(statements) > 1 else contextlib.nullcontext(), connection.cursor() as cursor:
        for sql, params in statements:
            execute_fast(cursor, sql, params)
        return cursor.fetchall() if cursor.description else []


def execute_fast(cursor, sql: str, params: list) -> None:
    """With GATEWAY_ASYNC_COMMIT, on PostgreSQL, commit without waiting for the WAL flush
    (`synchronous_commit = off` for this statement's transaction only; the asyncio pool's sessions have it
    set). A PostgreSQL crash can then lose the last fraction of a second of holds and settlements, each
    whole: never a partial one, never usage above a quota; a lost settlement is usage not charged."""
    if settings.GATEWAY_ASYNC_COMMIT and pgasync.vendor() == "postgresql":
        cursor.execute("SET LOCAL synchronous_commit TO OFF; " + sql, params)
        cursor.nextset()
    else:
        cursor.execute(sql, params)


async def run_async(steps: Generator):
    """`run` on the event loop: on PostgreSQL through the asyncio pool (no thread hop), waits on this
    loop's settlements (`room_freed`); elsewhere the whole generator in one database thread."""
    if not pgasync.available():
        return await in_worker_thread(run)(steps)
    result = None
    while True:
        try:
            step = steps.send(result)
        except StopIteration as stop:
            return stop.value
        if isinstance(step, Wait):
            await room_freed().wait(step.seconds)
            result = None
        else:
            [(sql, params)] = step
            result = await _fetch_retrying(sql, params)


async def _fetch_retrying(sql: str, params: list) -> list[tuple]:
    """One statement; once more on a fresh connection when the pooled one was lost (PostgreSQL restarted,
    the backend terminated): each statement is all or nothing, so a retry never applies a step twice
    unless the first committed and only its answer was lost, which for a settlement the usage record's
    unique request id refuses (charged once) and for a hold leaves a reservation the sweep releases."""
    try:
        return await pgasync.fetchall(sql, params)
    except psycopg.OperationalError as exc:
        logger.warning("database connection lost (%s): retrying once on a fresh one", exc)
        await (await pgasync.pool()).check()  # drop the pool's other dead connections first
        return await pgasync.fetchall(sql, params)


QUOTA_RETRY_SECONDS = 1.0  # longest pause between tries while the quota's room is held (no settlement woke it)
QUOTA_RETRY_AFTER_MS = 1000  # suggested to a client whose wait ran out


def reserve(entitlements: list[Entitlement], tokens: int, request_id: str, wait: float = 0.0,
            cost: Decimal = Decimal(0), budgets: Sequence[Budget] = ()) -> Hold:
    """Hold `tokens` on the first covering entitlement where they fit, and `cost` on each of `budgets`
    (the key's, then the organization's), all or nothing. When there is no room now, a 429:
    insufficient_quota (no retry) when the hold does not fit even with nothing in flight; else, after
    waiting up to `wait` seconds for holds to settle, the retryable quota_in_flight."""
    return run(_reserve_steps(entitlements, tokens, request_id, wait, cost, budgets))


async def reserve_async(entitlements: list[Entitlement], tokens: int, request_id: str,
                        cost: Decimal = Decimal(0), budgets: Sequence[Budget] = ()) -> Hold:
    """`reserve` on the event loop. On PostgreSQL it waits for room for up to GATEWAY_QUOTA_WAIT_SECONDS
    before the retryable 429, so that a burst over a quota is served as holds settle rather than refused:
    a settlement in this process wakes the waiters one at a time (`room_freed`), settlements elsewhere
    are seen by a retry every QUOTA_RETRY_SECONDS. In a database thread (SQLite) it does not wait: those
    few threads also run the settlements that would free the room."""
    wait = settings.GATEWAY_QUOTA_WAIT_SECONDS if pgasync.available() else 0.0
    hold = await run_async(_reserve_steps(entitlements, tokens, request_id, wait, cost, budgets))
    if pgasync.available():
        room_freed().notify()  # there may be room for the next waiter too
    return hold


def _reserve_steps(entitlements: list[Entitlement], tokens: int, request_id: str, wait: float, cost: Decimal,
                   budgets: Sequence[Budget]):
    deadline = time.monotonic() + wait
    budget_ids = tuple(b.pk for b in budgets)
    while True:
        now = timezone.now()
        expires_at = now + timedelta(seconds=settings.GATEWAY_RESERVATION_TTL_SECONDS)
        budgets_with_room = len(budgets)
        for entitlement in _may_fit(entitlements, tokens):
            [(reservation_id, tokens_used, budgets_held, budgets_with_room)] = yield hold_statements(
                entitlement, tokens, request_id, now, expires_at, cost, budgets)
            if reservation_id is not None:
                return Hold(reservation_id, entitlement.pk, tokens, cost, budget_ids)
            if budgets_held:  # PostgreSQL: the budgets before the one (or the entitlement) that had no room
                yield [release_budgets_statement(budget_ids[:budgets_held], cost)]
            if tokens_used is None:  # revoked meanwhile: never fits
                entitlement.token_quota = entitlement.tokens_used = 0
            else:  # what it has used now: tells a quota used up from one held by requests in flight
                entitlement.tokens_used = tokens_used
            if budgets_with_room < len(budgets):
                break  # a budget had no room: another entitlement would not help
        if budgets and budgets_with_room < len(budgets):
            spent = dict((yield [(f'SELECT id, spent FROM {BUDGETS} WHERE id IN ({", ".join(["%s"] * len(budgets))})',
                                  list(budget_ids))]))
            for budget in budgets:
                # A Decimal on PostgreSQL, a float from SQLite's raw cursor (Decimal - float would raise).
                budget.spent = Decimal(str(spent[budget.pk])).quantize(BUDGET_PLACES) if budget.pk in spent else budget.limit
                if budget.limit - budget.spent < cost:
                    raise insufficient_budget(budget, cost)
        elif not _may_fit(entitlements, tokens):
            raise insufficient_quota()
        pause = min(QUOTA_RETRY_SECONDS, deadline - time.monotonic())
        if pause <= 0:
            raise quota_in_flight(QUOTA_RETRY_AFTER_MS)
        yield Wait(pause)


def _may_fit(entitlements: list[Entitlement], tokens: int) -> list[Entitlement]:
    """The entitlements worth a round trip: those the tokens fit with nothing in flight (as last read)."""
    return [e for e in entitlements if e.token_quota is None or e.token_quota - e.tokens_used >= tokens]


class RoomFreed:
    """This event loop's waiters for quota room, woken in arrival order, one per settlement."""

    def __init__(self) -> None:
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def wait(self, timeout: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def notify(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


_room: dict[asyncio.AbstractEventLoop, RoomFreed] = {}


def room_freed() -> RoomFreed:
    loop = asyncio.get_running_loop()
    room = _room.get(loop)
    if room is None:
        _room.clear()  # a new event loop (tests): the old loop's waiters are gone with it
        room = _room[loop] = RoomFreed()
    return room


FITS = "revoked_at IS NULL AND (token_quota IS NULL OR tokens_used + tokens_reserved + %s <= token_quota)"
BUDGET_FITS = 'spent + reserved + %s <= "limit"'
BUDGET_PLACES = Decimal("1e-8")  # the budget columns' decimal places


def hold_statements(entitlement: Entitlement, tokens: int, request_id: str, now, expires_at,
                    cost: Decimal = Decimal(0), budgets: Sequence[Budget] = ()) -> list[Statement]:
    """The conditional UPDATEs (each budget's, then the entitlement's) and the Reservation row. They answer
    one row: the reservation id (NULL when the hold did not fit), what the entitlement has used (NULL when
    it is revoked; tells a quota used up from one held by requests in flight without a second query), how
    many budgets were held, and how many leading budgets had room. On PostgreSQL each row is re-checked
    under its lock, so a budget can be held while a later one (or the entitlement) had no room: the caller
    releases it, and the two counts are one. On SQLite a refused hold holds nothing (0), and the budgets
    had room exactly when all of them fit (else 0): a refusal by the entitlement alone is told from one by
    a budget, as on PostgreSQL."""
    columns = "organization_id, entitlement_id, tokens, request_id, created_at, expires_at, cost, key_budget_id, org_budget_id"
    budget_ids = [b.pk for b in budgets]
    key_budget = next((b.pk for b in budgets if b.api_key_id is not None), None)
    org_budget = next((b.pk for b in budgets if b.api_key_id is None), None)
    values = [tokens, request_id, now, expires_at, cost, key_budget, org_budget]
    if pgasync.vendor() == "postgresql":
        ctes, params, previous = [], [], "TRUE"
        for i, budget_id in enumerate(budget_ids):
            ctes.append(f"b{i} AS (UPDATE {BUDGETS} SET reserved = reserved + %s WHERE id = %s AND {BUDGET_FITS}"
                        f" AND {previous} RETURNING id)")
            params += [cost, budget_id, cost]
            previous = f"EXISTS (SELECT 1 FROM b{i})"
        held = " + ".join(f"(SELECT count(*) FROM b{i})" for i in range(len(budget_ids))) or "0"
        return [(
            "WITH " + "".join(c + ", " for c in ctes)
            + f"held AS (UPDATE {ENTITLEMENTS} SET tokens_reserved = tokens_reserved + %s WHERE id = %s AND {FITS}"
            f" AND {previous} RETURNING id, organization_id),"
            f" inserted AS (INSERT INTO {RESERVATIONS} ({columns}) SELECT organization_id, id, %s, %s, %s, %s, %s, %s, %s"
            " FROM held RETURNING id)"
            f" SELECT (SELECT id FROM inserted), (SELECT tokens_used FROM {ENTITLEMENTS} WHERE id = %s AND revoked_at IS NULL),"
            f" {held}, {held}",
            [*params, tokens, entitlement.pk, tokens, *values, entitlement.pk],
        )]
    # SQLite (one writer at a time): the first UPDATE checks every row, the next ones follow it (changes():
    # the rows the previous statement changed).
    rows = [(BUDGETS, "reserved", cost, budget_id, BUDGET_FITS) for budget_id in budget_ids]
    rows.append((ENTITLEMENTS, "tokens_reserved", tokens, entitlement.pk, FITS))
    fit = [f"EXISTS (SELECT 1 FROM {table} WHERE id = %s AND {fits})" for table, _, _, _, fits in rows]
    fit_params = [[row_id, amount] for _, _, amount, row_id, _ in rows]
    all_fit, all_fit_params = " AND ".join(fit), [p for pair in fit_params for p in pair]
    # after a refused hold (nothing changed): whether every budget had room, the entitlement aside
    budgets_fit, budgets_fit_params = " AND ".join(["1", *fit[:-1]]), [p for pair in fit_params[:-1] for p in pair]
    statements = []
    for i, (table, column, amount, row_id, _) in enumerate(rows):
        condition, extra = (all_fit, all_fit_params) if i == 0 else ("changes() = 1", [])
        statements.append((f"UPDATE {table} SET {column} = {column} + %s WHERE id = %s AND {condition}",
                           [amount, row_id, *extra]))
    return [
        *statements,
        (f"INSERT INTO {RESERVATIONS} ({columns}) SELECT organization_id, id, %s, %s, %s, %s, %s, %s, %s FROM {ENTITLEMENTS}"
         " WHERE id = %s AND changes() = 1", [*values, entitlement.pk]),
        (f"SELECT CASE WHEN changes() = 1 THEN last_insert_rowid() END, (SELECT tokens_used FROM {ENTITLEMENTS}"
         f" WHERE id = %s AND revoked_at IS NULL), 0, CASE WHEN {budgets_fit} THEN %s ELSE 0 END",
         [entitlement.pk, *budgets_fit_params, len(budget_ids)]),
    ]


def release_budgets_statement(budget_ids: tuple[int, ...], cost: Decimal) -> Statement:
    return (f'UPDATE {BUDGETS} SET reserved = reserved - %s WHERE id IN ({", ".join(["%s"] * len(budget_ids))})',
            [cost, *budget_ids])


def charge_for(hold: Hold, used: int) -> int:
    """What the entitlement is charged: the exact usage, never more than was reserved."""
    if used > hold.tokens:
        logger.error("usage %d exceeded reservation %d (entitlement %d): charging the reservation",
                     used, hold.tokens, hold.entitlement_id)
    return max(0, min(used, hold.tokens))


def insert_statement(record: UsageRecord) -> Statement:
    """The usage record's INSERT, as Django would write it (defaults and auto_now_add applied)."""
    fields, sql = usage_insert()
    return sql, [f.get_db_prep_save(f.pre_save(record, add=True), connection) for f in fields]


@functools.cache
def usage_insert() -> tuple[list, str]:
    """The usage table's columns and INSERT text (the same text every time: a prepared statement)."""
    fields = [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    placeholders = ", ".join(["%s"] * len(fields))
    return fields, f"INSERT INTO {USAGE} ({columns}) VALUES ({placeholders})"


def charge_sql(limit: str, used: str, others: str = "") -> str:
    """What a settlement adds to `used`: the charge, cut to what `limit` still allows. While the hold is
    live (`others` empty) that only bites when an operator lowered the quota or budget below used +
    reserved meanwhile (the usage record keeps the full count), so the statement never violates the
    table's check constraint and never loses the record; once the expiry sweep released the hold
    (`others`: the holds in flight) it charges only what fits beside them. The charge is subtracted, not
    compared: SQLite binds a Decimal as text, and a number compared with text is always the smaller (an
    arithmetic operand is converted), which charged a budget all its room on `make run`."""
    room = f"{limit} - {used}" + (f" - {others}" if others else "")
    return f"CASE WHEN {limit} IS NULL OR {room} - %s >= 0 THEN %s WHEN {room} > 0 THEN {room} ELSE 0 END"


def settle(hold: Hold, used: int, record: UsageRecord | None, touch_key: APIKey | None = None) -> None:
    """Charge `used` tokens, release the rest of the hold, write the usage record and mark the key used,
    atomically. A hold the sweep already released is charged what still fits."""
    run(_settle_steps(hold, used, record, touch_key))


async def settle_async(hold: Hold, used: int, record: UsageRecord | None, touch_key: APIKey | None = None) -> None:
    """`settle` on the event loop; wakes one request waiting for quota room in this process."""
    await run_async(_settle_steps(hold, used, record, touch_key))
    if pgasync.available():
        room_freed().notify()


def _settle_steps(hold: Hold, used: int, record: UsageRecord | None, touch_key: APIKey | None):
    now = timezone.now()
    touch = touch_key is not None and (touch_key.last_used_at is None or now - touch_key.last_used_at > timedelta(minutes=1))
    cost = min(record.cost, hold.cost) if record is not None else Decimal(0)
    yield settle_statements(hold, charge_for(hold, used), cost, record, touch_key.pk if touch else None, now)


def settle_statements(hold: Hold, charge: int, cost: Decimal, record: UsageRecord | None, touch_key_id: int | None,
                      now) -> list[Statement]:
    """Release the hold, charge the tokens and the cost on the budgets (at the late rule when the hold is
    gone), insert the usage record and mark the key used. Rows are locked in the order a hold takes them
    (budgets, then the entitlement), so a hold and a settlement never deadlock."""
    record_sql, record_params = insert_statement(record) if record is not None else ("", [])
    in_list = ", ".join(["%s"] * len(hold.budget_ids))
    if pgasync.vendor() == "postgresql":
        live = "EXISTS (SELECT 1 FROM released)"
        budgeted, params, after = "", [], ""
        if hold.budget_ids:
            in_hold, late = charge_sql('b."limit"', "b.spent"), charge_sql('b."limit"', "b.spent", "b.reserved")
            budgeted = (
                f" budgeted AS (UPDATE {BUDGETS} b SET reserved = b.reserved - CASE WHEN {live} THEN %s ELSE 0 END,"
                f" spent = b.spent + CASE WHEN {live} THEN {in_hold} ELSE {late} END WHERE b.id IN ({in_list})"
                " RETURNING b.id),")
            params = [hold.cost, cost, cost, cost, cost, *hold.budget_ids]
            after = " AND (SELECT count(*) FROM budgeted) >= 0"
        return [(
            f"WITH released AS (DELETE FROM {RESERVATIONS} WHERE id = %s RETURNING tokens),{budgeted}"
            f" charged AS (UPDATE {ENTITLEMENTS} e SET"
            " tokens_reserved = e.tokens_reserved - coalesce((SELECT tokens FROM released), 0),"
            f" tokens_used = e.tokens_used + CASE WHEN {live} THEN {charge_sql('e.token_quota', 'e.tokens_used')}"
            f" ELSE {charge_sql('e.token_quota', 'e.tokens_used', 'e.tokens_reserved')} END"
            f" WHERE e.id = %s{after} RETURNING e.id),"
            f" touched AS (UPDATE {API_KEYS} SET last_used_at = %s WHERE id = %s RETURNING id)"
            + (f", recorded AS ({record_sql} RETURNING id)" if record is not None else "")
            + " SELECT (SELECT count(*) FROM charged)",
            [hold.reservation_id, *params, charge, charge, charge, charge, hold.entitlement_id, now, touch_key_id,
             *record_params],
        )]
    live = f"EXISTS (SELECT 1 FROM {RESERVATIONS} WHERE id = %s)"
    statements = []
    if hold.budget_ids:
        in_hold, late = charge_sql('"limit"', "spent"), charge_sql('"limit"', "spent", "reserved")
        statements.append((
            f"UPDATE {BUDGETS} SET reserved = reserved - CASE WHEN {live} THEN %s ELSE 0 END,"
            f" spent = spent + CASE WHEN {live} THEN {in_hold} ELSE {late} END WHERE id IN ({in_list})",
            [hold.reservation_id, hold.cost, hold.reservation_id, cost, cost, cost, cost, *hold.budget_ids]))
    statements += [
        (f"UPDATE {ENTITLEMENTS} SET tokens_reserved = tokens_reserved - CASE WHEN {live} THEN %s ELSE 0 END,"
         f" tokens_used = tokens_used + CASE WHEN {live} THEN {charge_sql('token_quota', 'tokens_used')}"
         f" ELSE {charge_sql('token_quota', 'tokens_used', 'tokens_reserved')} END WHERE id = %s",
         [hold.reservation_id, hold.tokens, hold.reservation_id, charge, charge, charge, charge, hold.entitlement_id]),
        (f"DELETE FROM {RESERVATIONS} WHERE id = %s", [hold.reservation_id]),
        (f"UPDATE {API_KEYS} SET last_used_at = %s WHERE id = %s", [now, touch_key_id]),
    ]
    if record is not None:
        statements.append((record_sql, record_params))
    return statements


def extend_hold(hold: Hold) -> None:
    """Push a live request's hold expiry a full TTL ahead, so the sweep never releases the hold of a
    request still running (it releases those of crashed requests, which stop extending theirs)."""
    run(_extend_steps(hold))


async def extend_hold_async(hold: Hold) -> None:
    await run_async(_extend_steps(hold))


def _extend_steps(hold: Hold):
    expires_at = timezone.now() + timedelta(seconds=settings.GATEWAY_RESERVATION_TTL_SECONDS)
    yield [(f"UPDATE {RESERVATIONS} SET expires_at = %s WHERE id = %s", [expires_at, hold.reservation_id])]


@dataclass
class Admission:
    """An admitted request: who, which model and replica, its rate-limit decision and token hold."""

    caller: Caller
    entry: CatalogEntry
    upstream: Upstream
    decision: Decision
    hold: Hold


def _route(
    caller: Caller, inference: InferenceRequest | None, invalid: GatewayError | None, labels: dict | None,
) -> tuple[CatalogEntry, list[Entitlement], Upstream]:
    """The steps between authentication and the limits: the body's validation error (400), model (404),
    replica (503)."""
    if labels is not None:
        labels["organization"] = caller.organization.slug
    if invalid is not None or inference is None:
        raise invalid or GatewayError(400, "Invalid request.")
    entry, entitlements = caller.resolve(inference.model)
    if labels is not None:
        labels["model"] = entry.model.name
    refusal = entry.model.endpoint_refusal(inference.endpoint)
    if refusal:
        raise GatewayError(400, refusal, "invalid_request_error", "model_not_supported", "model")
    upstream = routing.first_available(caller, entry, inference.endpoint)  # the model or a fallback
    if upstream is None:
        raise service_unavailable(f"The model `{inference.model}` is temporarily unavailable: no healthy replica. Please retry.")
    return entry, entitlements, upstream


def hold_size(inference: InferenceRequest, entry: CatalogEntry, builder) -> int:
    """The tokens to hold: the prompt counted exactly with the replica's tokenizer when it is known."""
    tool_format = entry.model.tool_format if inference.endpoint == "chat/completions" else None
    prompt = prompt_count.count(builder, inference, tool_format)
    return inference.reservation(entry.model.context_length, prompt, settings.GATEWAY_PROMPT_OVERHEAD_TOKENS,
                                 settings.GATEWAY_DEFAULT_MAX_TOKENS)


def worst_cost(model: AIModel, inference: InferenceRequest, tokens: int) -> Decimal:
    """The most a request holding `tokens` can cost: its completion bound (n × max_tokens) at the output
    price and the rest at the input price, or every token at the input price when that is dearer."""
    bound = inference.max_completion_tokens or inference.default_max_tokens
    completion = tokens if bound is None else min(tokens, inference.n * bound)
    if model.price_input_per_million >= model.price_output_per_million:
        completion = 0
    return model.cost(tokens - completion, 0, completion)


def admit_request(
    credential: str | SessionCredential | KeyCredential, inference: InferenceRequest | None,
    invalid: GatewayError | None, request_id: str, limiter: RateLimiter, labels: dict | None = None,
) -> Admission:
    """`admit_request_async` in a thread of its own (the batch runner, a Celery worker): the same steps,
    with the blocking limiter and `reserve` (which does not wait for room: the runner retries the line)."""
    caller = admit_credential(credential)
    entry, entitlements, upstream = _route(caller, inference, invalid, labels)
    tokens = hold_size(inference, entry, prompt_count.builder_for(upstream))
    decision = limiter.acquire(caller.api_key, caller.organization, tokens, request_id)
    if not decision.allowed:
        raise rate_limit_error(decision)
    try:
        cost = worst_cost(entry.model, inference, tokens) if caller.budgets else Decimal(0)
        hold = reserve(entitlements, tokens, request_id, cost=cost, budgets=caller.budgets)
    except GatewayError as exc:
        limiter.release(decision)
        exc.headers = {**decision.headers, **exc.headers}
        raise
    except BaseException:
        limiter.release(decision)
        raise
    return Admission(caller, entry, upstream, decision, hold)


async def admit_request_async(
    credential: str | SessionCredential, inference: InferenceRequest | None, invalid: GatewayError | None, request_id: str, limiter: RateLimiter,
    labels: dict | None = None,
) -> Admission:
    """Everything before forwarding: key (401), entitlement (403), then the body's validation error if
    any (400), model (404), replica (503), rate limits (429 rate_limit_exceeded) and the token hold (429
    insufficient_quota or quota_in_flight). `labels` receives the organization and model for the
    gateway's metrics as soon as they are known, refusals included."""
    with telemetry.span("gateway.auth"):
        caller = await admit_credential_async(credential)
    entry, entitlements, upstream = _route(caller, inference, invalid, labels)
    builder = prompt_count.cached(upstream)
    if builder is False:  # first request to this replica (or due again): fetch its tokenizer off the loop
        builder = await sync_to_async(prompt_count.fetch, thread_sensitive=False)(upstream)
    tokens = hold_size(inference, entry, builder)
    decision = await limiter.acquire_async(caller.api_key, caller.organization, tokens, request_id)
    if not decision.allowed:
        raise rate_limit_error(decision)
    try:
        with telemetry.span("gateway.quota_reservation", {"maas.reserved_tokens": tokens}):
            cost = worst_cost(entry.model, inference, tokens) if caller.budgets else Decimal(0)
            hold = await reserve_async(entitlements, tokens, request_id, cost, caller.budgets)
    except GatewayError as exc:
        await limiter.release_async(decision)
        exc.headers = {**decision.headers, **exc.headers}
        raise
    except BaseException:
        await limiter.release_async(decision)
        raise
    return Admission(caller, entry, upstream, decision, hold)


def expire_reservations(now=None) -> int:
    """Release holds (tokens and budget) whose request never settled (crashed worker); returns how many
    were released."""
    now = now or timezone.now()
    released = 0
    for reservation_id in Reservation.objects.filter(expires_at__lte=now).values_list("pk", flat=True):
        with transaction.atomic():
            reservation = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
            if reservation is None:
                continue  # settled meanwhile
            budget_ids = [b for b in (reservation.key_budget_id, reservation.org_budget_id) if b is not None]
            if budget_ids:  # budgets before the entitlement: the order holds and settlements lock them in
                Budget.objects.filter(pk__in=budget_ids).update(reserved=F("reserved") - reservation.cost)
            Entitlement.objects.filter(pk=reservation.entitlement_id).update(
                tokens_reserved=F("tokens_reserved") - reservation.tokens
            )
            reservation.delete()
            released += 1
    if released:
        logger.warning("released %d expired token reservations", released)
    return released
