"""A few long-lived threads for the gateway's blocking database and Redis calls: not a new thread per
request (as thread-sensitive calls get under ASGI), and not so many that they fight over the GIL."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connections

_db_threads = ThreadPoolExecutor(max_workers=settings.GATEWAY_DB_THREADS, thread_name_prefix="gateway-db")


def in_worker_thread(function):
    """Run `function` on the gateway's database threads, handing its connection back to the pool after."""

    def run(*args):
        try:
            return function(*args)
        finally:
            connections.close_all()

    return sync_to_async(run, thread_sensitive=False, executor=_db_threads)
