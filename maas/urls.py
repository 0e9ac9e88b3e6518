from allauth.account.decorators import secure_admin_login
from django.contrib import admin
from django.urls import include, path

from inference.metrics import metrics_view
from maas.health import health

# The admin has no login form of its own: allauth's is rate-limited and asks for the second factor.
admin.site.login = secure_admin_login(admin.site.login)

urlpatterns = [
    path("health", health, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("accounts/", include("allauth.urls")),
    path("", include("inference.urls")),
    path("", include("accounts.urls")),
]

# Under /v1/ even errors raised outside the API views answer in OpenAI's JSON error format.
handler400 = "inference.errors.bad_request"
handler403 = "inference.errors.permission_denied"
handler404 = "inference.errors.page_not_found"
handler500 = "inference.errors.server_error"
