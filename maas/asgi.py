"""ASGI entry point: the gateway's async views run here (uvicorn maas.asgi:application)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "maas.settings")

application = get_asgi_application()
