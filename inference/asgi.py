"""The ASGI application with a lean path for the API: requests under /v1/ go through a Django handler
whose middleware chain leaves out what only browsers need (sessions, CSRF, auth, messages, static
files, allauth, the console's organization switch). Those are partly synchronous, and one synchronous
middleware moves every request onto a worker thread and back, several times; the API's chain is
fully asynchronous. Same settings, same URLs, same views.
"""

from __future__ import annotations

from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

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


def api_middleware() -> list[str]:
    return [m for m in settings.MIDDLEWARE if m not in BROWSER_ONLY_MIDDLEWARE]


class APIHandler(ASGIHandler):
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
