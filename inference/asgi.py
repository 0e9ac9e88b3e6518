"""The ASGI application with a lean path for the API: requests under /v1/ go through a Django handler
whose middleware chain leaves out what only browsers need (sessions, CSRF, auth, messages, static
files, allauth, the console's organization switch). Those are partly synchronous, and one synchronous
middleware moves every request onto a worker thread and back, several times; the API's chain is
fully asynchronous. Same settings, same URLs, same views.
"""

from __future__ import annotations

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware

BROWSER_ONLY_MIDDLEWARE = {
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "accounts.middleware.CurrentOrganizationMiddleware",
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


def api_middleware() -> list[str]:
    return [INLINE.get(m, m) for m in settings.MIDDLEWARE if m not in BROWSER_ONLY_MIDDLEWARE]


class APIHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):
        # Without Django's per-request ThreadSensitiveContext: on this path the only thread-sensitive
        # call left is Django closing the response (request_finished), so it shares asgiref's one
        # long-lived thread instead of starting a thread for every request. The views' blocking work
        # goes to their own executor (views.in_worker_thread) and never relies on it.
        await self.handle(scope, receive, send)

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
