"""The ASGI application with a lean path for the API: requests under /v1/ go through a Django handler
whose middleware chain leaves out what only browsers need (sessions, CSRF, auth, messages, static
files, allauth, the console's organization switch). Those are partly synchronous, and one synchronous
middleware moves every request onto a worker thread and back, several times; the API's chain is
fully asynchronous. Same settings, same URLs, same views.
"""

from __future__ import annotations

import asyncio
import contextlib

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.db import connections
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import set_script_prefix

BROWSER_ONLY_MIDDLEWARE = {
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "accounts.middleware.CurrentOrganizationMiddleware",
    "accounts.middleware.MFARequiredMiddleware",  # sessions only
    "accounts.audit.AuditContextMiddleware",  # the gateway's writes are metering, never audited
}
API_PREFIX = "/v1/"


# Django's MiddlewareMixin, in an asynchronous chain, runs process_request/process_response through
# sync_to_async: two thread hops per middleware per request. These two do no I/O: run them inline.
INLINE = {
    "django.middleware.security.SecurityMiddleware": "inference.asgi.InlineSecurityMiddleware",
    "django.middleware.common.CommonMiddleware": "inference.asgi.InlineCommonMiddleware",
}


class InlineHooks:
    async def __acall__(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            response = self.process_response(request, response)
        return response


class InlineSecurityMiddleware(InlineHooks, SecurityMiddleware):
    pass


class InlineCommonMiddleware(InlineHooks, CommonMiddleware):
    pass


async def run_signal_hooks(function) -> None:
    """request_started / request_finished (Django's receivers reset and close this context's database
    connections): inline when this context has none open (the API's queries run on their own pool or
    worker threads), else on a thread as Django does, since closing a connection blocks."""
    if any(conn.connection is not None for conn in connections.all(initialized_only=True)):
        await sync_to_async(function)()
    else:
        function()


def api_middleware() -> list[str]:
    return [INLINE.get(m, m) for m in settings.MIDDLEWARE if m not in BROWSER_ONLY_MIDDLEWARE]


class APIHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):
        # Without Django's per-request ThreadSensitiveContext: the views' blocking work goes to their
        # own executor (views.in_worker_thread) and never relies on a request-bound thread.
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        """Django's ASGIHandler.handle, but request_started and the response's close (request_finished)
        run inline when they have nothing blocking to do: two thread hops fewer per request."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        await run_signal_hooks(lambda: signals.request_started.send(sender=self.__class__, scope=scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            await run_signal_hooks(error_response.close)
            return

        async def process_request(request, send):
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # the client disconnected during the send
                await self.send_response(response, send)
            return response

        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            response = tasks[1].result()
        except asyncio.CancelledError:
            await run_signal_hooks(lambda: signals.request_finished.send(sender=self.__class__))
        else:
            await run_signal_hooks(response.close)
        body_file.close()

    def load_middleware(self, is_async: bool = False) -> None:
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = api_middleware()  # read once, at start-up
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


def with_api_path(application):
    """Wrap the project's ASGI application: /v1/ (and /v1) to the API handler, the rest unchanged."""
    api = APIHandler()

    async def app(scope, receive, send):
        if scope["type"] == "http" and (scope["path"].startswith(API_PREFIX) or scope["path"] == API_PREFIX[:-1]):
            return await api(scope, receive, send)
        return await application(scope, receive, send)

    return app
