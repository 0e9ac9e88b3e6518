from django.contrib import admin
from django.urls import include, path

from inference.metrics import metrics_view
from maas.health import health

urlpatterns = [
    path("health", health, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    path("", include("inference.urls")),
    path("", include("accounts.urls")),
]
