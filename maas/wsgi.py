"""WSGI entry point, for deployments that serve only the console."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "maas.settings")

from maas.telemetry import configure_telemetry  # noqa: E402

# Before the application is built: the Django instrumentation inserts its middleware.
configure_telemetry("maas-web")

application = get_wsgi_application()
