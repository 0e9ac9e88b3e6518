"""The gateway's asyncio database path connects with the same OPTIONS as Django (sslmode, options, …):
TLS settings never silently fall back to plain text there."""

from __future__ import annotations

import psycopg
import pytest
from django.db import connection

from inference import pgasync

pytestmark = pytest.mark.django_db


@pytest.fixture
def options(monkeypatch):
    def set_options(**values):
        monkeypatch.setitem(connection.settings_dict, "OPTIONS", {**connection.settings_dict.get("OPTIONS", {}), **values})
    return set_options


async def test_sslmode_require_is_honoured(options):
    # This machine's PostgreSQL has no TLS: a path that honours sslmode=require must refuse to connect.
    options(sslmode="require")
    with pytest.raises(psycopg.OperationalError, match="SSL"):
        await psycopg.AsyncConnection.connect(pgasync.conninfo())


async def test_server_options_are_kept_next_to_synchronous_commit(options, settings):
    settings.GATEWAY_ASYNC_COMMIT = True
    options(options="-c statement_timeout=4321", sslmode="disable", application_name="maas-gateway")
    async with await psycopg.AsyncConnection.connect(pgasync.conninfo()) as conn:
        cursor = await conn.execute("SELECT current_setting('statement_timeout'), current_setting('synchronous_commit'),"
                                    " current_setting('application_name')")
        assert await cursor.fetchone() == ("4321ms", "off", "maas-gateway")


def test_django_only_options_do_not_reach_libpq(options):
    options(pool={"min_size": 1}, isolation_level=1, server_side_binding=True, sslmode="verify-full",
            sslrootcert="/etc/ssl/ca.pem")
    info = psycopg.conninfo.conninfo_to_dict(pgasync.conninfo())
    assert info["sslmode"] == "verify-full" and info["sslrootcert"] == "/etc/ssl/ca.pem"
    assert not {"pool", "isolation_level", "server_side_binding"} & set(info)
