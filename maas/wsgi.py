"""WSGI entry point, for deployments that serve only the console."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "maas.settings")

application = get_wsgi_application()
