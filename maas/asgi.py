"""ASGI entry point: the gateway's async views run here (uvicorn maas.asgi:application)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "maas.settings")

from maas.telemetry import configure_telemetry  # noqa: E402

# Before the application is built: the Django instrumentation inserts its middleware.
configure_telemetry("maas-web")

from inference.asgi import with_api_path  # noqa: E402

# /v1/ runs through a fully asynchronous middleware chain (inference/asgi.py).
application = with_api_path(get_asgi_application())
