"""The hot path's statements on asyncio psycopg (PostgreSQL only), so admission and settlement run on
the event loop itself instead of being handed to a worker thread and back: `quotas.run_async` drives the
money path's steps here. A pool of its own per process (GATEWAY_ASYNC_DB_POOL_SIZE)."""

from __future__ import annotations

import asyncio
import functools

from django.conf import settings
from django.db import connection
from psycopg.conninfo import make_conninfo
from psycopg.pq import Conninfo
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool

_pools: dict[asyncio.AbstractEventLoop, AsyncConnectionPool] = {}


def available() -> bool:
    return settings.GATEWAY_ASYNC_DB and vendor() == "postgresql"


@functools.cache
def vendor() -> str:
    """The default database's vendor (fixed for the process; `connection` is a per-context lookup)."""
    return connection.vendor


@functools.cache
def libpq_keywords() -> frozenset[str]:
    return frozenset(option.keyword.decode() for option in Conninfo.get_defaults())


def conninfo() -> str:
    """Django's connection settings as a libpq string: NAME/USER/…, plus every libpq parameter in
    OPTIONS (sslmode, sslrootcert, options, …) so TLS never silently falls back on this path.
    Django-only OPTIONS (pool, isolation_level, server_side_binding, …) are left out."""
    s = connection.settings_dict
    params = {key: value for key, value in (s.get("OPTIONS") or {}).items() if key in libpq_keywords()}
    if settings.GATEWAY_ASYNC_COMMIT:
        params["options"] = " ".join(filter(None, [params.get("options"), "-c synchronous_commit=off"]))
    return make_conninfo(
        dbname=s["NAME"], user=s["USER"] or None, password=s["PASSWORD"] or None, host=s["HOST"] or None,
        port=str(s["PORT"]) if s["PORT"] else None, **{k: str(v) for k, v in params.items()},
    )


async def _as_django(conn) -> None:
    """jsonb as text, as on Django's own connections, so the ORM's field converters read these rows too."""
    conn.adapters.register_loader("jsonb", TextLoader)


async def pool() -> AsyncConnectionPool:
    loop = asyncio.get_running_loop()
    current = _pools.get(loop)
    if current is None:
        current = AsyncConnectionPool(
            conninfo(), min_size=1, max_size=settings.GATEWAY_ASYNC_DB_POOL_SIZE, open=False,
            timeout=settings.GATEWAY_ASYNC_DB_TIMEOUT,
            kwargs={"autocommit": True}, configure=_as_django,
        )
        _pools.clear()
        _pools[loop] = current
        await current.open(wait=False)
    return current


async def fetchall(sql: str, params: list) -> list[tuple]:
    """The statement's rows; none for one that answers no rows (an UPDATE without RETURNING), as
    `quotas.execute` on Django's connection (psycopg's fetchall raises there)."""
    async with (await pool()).connection() as conn:
        cursor = await conn.execute(sql, params, prepare=True)
        return await cursor.fetchall() if cursor.description else []


async def fetchone(sql: str, params: list) -> tuple | None:
    """One statement, one round trip; with GATEWAY_ASYNC_COMMIT without waiting for the WAL flush."""
    async with (await pool()).connection() as conn:
        cursor = await conn.execute(sql, params, prepare=True)
        return await cursor.fetchone()
