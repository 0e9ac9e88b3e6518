"""GET /health: liveness and readiness of a web process (container health checks, load balancers)."""

from django.db import DatabaseError, connection
from django.http import JsonResponse


def health(request):
    """200 when the database answers, 503 otherwise; public and cheap (one SELECT 1)."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        return JsonResponse({"status": "unavailable", "database": "down"}, status=503)
    return JsonResponse({"status": "ok"})
