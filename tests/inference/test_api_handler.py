"""The /v1/ ASGI handler (inference/asgi.py) keeps Django's request signals while skipping its thread hops."""

from __future__ import annotations

import asyncio
import json
import os
import threading

import pytest
from django.core import signals
from django.db import connection, connections

from inference.asgi import APIHandler, run_signal_hooks


async def call(handler, path: str) -> tuple[int, dict, bytes]:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost")], "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80),
    }
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the client stays connected

    async def send(message):
        sent.append(message)

    await handler(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


@pytest.fixture
def no_open_connection():
    connections.close_all()  # on this (the event loop's) thread, before the test's loop runs


def close_this_contexts_connections() -> None:
    """Django's connections are per context: an earlier test in the run (pytest-django runs database tests
    first) can leave one open in the context the test coroutine inherits, so close them there too (a
    blocking call, allowed here for the test's set-up only)."""
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        connections.close_all()
    finally:
        del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]


async def test_request_started_and_finished_are_sent_once_each_on_the_event_loop_thread(no_open_connection):
    close_this_contexts_connections()
    seen = []

    def started(**kwargs):
        seen.append(("started", threading.get_ident()))

    def finished(**kwargs):
        seen.append(("finished", threading.get_ident()))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        status, headers, body = await call(APIHandler(), "/v1/no-such-endpoint")
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    assert status == 404 and headers["x-request-id"].startswith("req_")
    assert json.loads(body)["error"]["code"] == "unknown_url"
    loop_thread = threading.get_ident()
    assert seen == [("started", loop_thread), ("finished", loop_thread)]


async def test_hooks_run_inline_without_an_open_connection(no_open_connection):
    close_this_contexts_connections()
    threads = []
    await run_signal_hooks(lambda: threads.append(threading.get_ident()))
    assert threads == [threading.get_ident()]


@pytest.mark.django_db(transaction=True)
async def test_hooks_go_to_a_thread_when_this_context_holds_an_open_database_connection(monkeypatch):
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "1")  # open one in the loop's context, as a test can
    connection.ensure_connection()
    try:
        threads = []
        await run_signal_hooks(lambda: threads.append(threading.get_ident()))  # closing it may block
        assert len(threads) == 1 and threads[0] != threading.get_ident()
    finally:
        connection.close()


def test_the_api_chain_is_fully_asynchronous():
    """One synchronous middleware would move every /v1/ request onto a worker thread and back
    (MFARequiredMiddleware and the audit context middleware are session-only and left out)."""
    from django.utils.module_loading import import_string

    from inference.asgi import api_middleware

    chain = api_middleware()
    assert "accounts.audit.AuditContextMiddleware" not in chain
    for path in chain:
        assert getattr(import_string(path), "async_capable", False), path
