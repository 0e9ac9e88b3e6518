"""Settings, all from the environment (12-factor).

Embedded defaults (no variables set): SQLite file, local-memory cache, Celery tasks run eagerly.
Production: set DATABASE_URL, REDIS_URL, SECRET_KEY, ALLOWED_HOSTS and the EMAIL_* variables.
"""

import json
import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from accounts import sso_config

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str = "") -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


DEBUG = env_bool("DEBUG")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if DEBUG:
        SECRET_KEY = "insecure-development-key-do-not-use-in-production"
    else:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")

# Keyed hash secret for API keys, authorization codes and invitation tokens. A job of its own:
# rotating a leaked SECRET_KEY (sessions, signed links) must not invalidate every key and code,
# so production requires it set, and different from SECRET_KEY.
API_KEY_HMAC_SECRET = os.environ.get("API_KEY_HMAC_SECRET", "")
if not API_KEY_HMAC_SECRET:
    if DEBUG:
        API_KEY_HMAC_SECRET = SECRET_KEY
    else:
        raise ImproperlyConfigured("API_KEY_HMAC_SECRET must be set when DEBUG is off (it keys API keys and codes).")
elif API_KEY_HMAC_SECRET == SECRET_KEY and not DEBUG:
    raise ImproperlyConfigured("API_KEY_HMAC_SECRET must differ from SECRET_KEY.")

# Encrypts the API keys of external upstreams at rest (inference/secrets.py). Defaults to SECRET_KEY; set
# it on its own so rotating SECRET_KEY does not make the stored keys unreadable.
DEPLOYMENT_KEY_SECRET = os.environ.get("DEPLOYMENT_KEY_SECRET", "") or SECRET_KEY

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]" if DEBUG else "")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "allauth.socialaccount",
    "allauth.socialaccount.providers.openid_connect",
    "csp",
    "pgtrigger",
    "pghistory",
    "pghistory.admin",
    "accounts",
    "inference",
]

MIDDLEWARE = [
    "maas.logging.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "allauth.account.middleware.AccountMiddleware",
    "accounts.middleware.CurrentOrganizationMiddleware",
    "accounts.middleware.MFARequiredMiddleware",
    "accounts.audit.AuditContextMiddleware",
]

# Audit log (django-pghistory, accounts/audit.py): event tables are append-only (triggers refuse an
# UPDATE or DELETE of an event); the admin lists every event, read-only, with who, URL and context (IP).
PGHISTORY_APPEND_ONLY = True
PGHISTORY_ADMIN_MODEL = "pghistory.MiddlewareEvents"
PGHISTORY_ADMIN_LIST_DISPLAY = [
    "pgh_created_at", "pgh_label", "pgh_obj_model", "pgh_obj_id", "user", "url", "pgh_context", "pgh_diff",
]

ROOT_URLCONF = "maas.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.organization",
            ],
        },
    },
]

WSGI_APPLICATION = "maas.wsgi.application"
ASGI_APPLICATION = "maas.asgi.application"

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
        conn_health_checks=True,
    )
}
# A psycopg connection pool (PostgreSQL only): under ASGI every request runs its ORM work in its own
# thread context, so without a pool each request opens a new PostgreSQL connection.
if env_bool("DATABASE_POOL") and DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("DATABASE_POOL_MIN_SIZE", 2),
        "max_size": env_int("DATABASE_POOL_MAX_SIZE", 20),
        "timeout": env_float("DATABASE_POOL_TIMEOUT", 5.0),
    }
# Lets several test runs share one PostgreSQL server without clobbering each other.
if os.environ.get("TEST_DATABASE_NAME"):
    DATABASES["default"]["TEST"] = {"NAME": os.environ["TEST_DATABASE_NAME"]}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
AUTH_USER_MODEL = "accounts.User"

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            "KEY_PREFIX": os.environ.get("CACHE_KEY_PREFIX", "maas"),
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# django-allauth: email is the login, verified before use.
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_EMAIL_VERIFICATION = os.environ.get("ACCOUNT_EMAIL_VERIFICATION", "mandatory")
ACCOUNT_CONFIRM_EMAIL_ON_GET = False
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_RATE_LIMITS = {
    "login_failed": os.environ.get("LOGIN_FAILED_RATE_LIMIT", "10/m/ip,5/5m/key"),
    "signup": "20/m/ip",
    "reset_password": "20/m/ip,5/m/key",
}
ACCOUNT_ADAPTER = "accounts.adapters.AccountAdapter"
# Not the request's host (allauth's default without the sites framework): a Host header is the client's.
ACCOUNT_EMAIL_SUBJECT_PREFIX = os.environ.get("ACCOUNT_EMAIL_SUBJECT_PREFIX", "[MaaS] ")
# Where the console is reached from outside, for links printed by management commands (create_org).
CONSOLE_BASE_URL = os.environ.get("CONSOLE_BASE_URL", "http://localhost:8000").rstrip("/")
# The OpenAI base URL the console's snippets show (quickstart, playground "view code"); empty: the
# console's own origin + /v1 (the gateway serves both).
API_BASE_URL = os.environ.get("API_BASE_URL", "").rstrip("/")
# Second factor (allauth.mfa): TOTP, security keys (WebAuthn, through fido2) and recovery codes. Staff
# must set one up at their first login (MFA_REQUIRED_FOR_STAFF); anyone else may. /admin/login/ hands over
# to this login (maas/urls.py). WebAuthn needs the console on https (or http://localhost).
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes", "webauthn"]
MFA_TOTP_ISSUER = os.environ.get("MFA_TOTP_ISSUER", "MaaS")
MFA_REQUIRED_FOR_STAFF = env_bool("MFA_REQUIRED_FOR_STAFF", default=True)
# Single sign-on (OpenID Connect, allauth's generic provider; accounts/sso_config.py): off unless
# SSO_OIDC_SERVER_URL and SSO_OIDC_CLIENT_ID are set. A provider-verified email that a local account
# already has signs in to that account and connects it (SSO_EMAIL_AUTHENTICATION; a local account whose
# address was never verified loses its password first, allauth's guard against pre-registration).
# The second factor is still asked of users who have one; staff and organization MFA rules apply as is.
SOCIALACCOUNT_PROVIDERS = sso_config.oidc_providers(os.environ)
SOCIALACCOUNT_ADAPTER = "accounts.adapters.SocialAccountAdapter"
SOCIALACCOUNT_EMAIL_REQUIRED = True
SOCIALACCOUNT_AUTO_SIGNUP = True
SOCIALACCOUNT_LOGIN_ON_GET = False  # "Continue" is a POST (CSRF), not a link any page can make you follow
SOCIALACCOUNT_STORE_TOKENS = False
SOCIALACCOUNT_EMAIL_AUTHENTICATION = env_bool("SSO_EMAIL_AUTHENTICATION", default=True)
SOCIALACCOUNT_EMAIL_AUTHENTICATION_AUTO_CONNECT = SOCIALACCOUNT_EMAIL_AUTHENTICATION
SSO_DOMAIN_ORGANIZATIONS = sso_config.domain_organizations(os.environ.get("SSO_DOMAIN_ORGANIZATIONS", ""))
LOGIN_REDIRECT_URL = "/"
LOGIN_URL = "account_login"
ACCOUNT_LOGOUT_REDIRECT_URL = "account_login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if not DEBUG
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG
# The Batch API's files (/v1/files): a local directory by default; any Django storage backend by
# BATCH_FILES_STORAGE_BACKEND and its options as JSON (S3-compatible: "storages.backends.s3.S3Storage"
# from django-storages, options such as {"bucket_name": ..., "endpoint_url": ...}).
STORAGES["batch_files"] = {
    "BACKEND": os.environ.get("BATCH_FILES_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage"),
    "OPTIONS": json.loads(os.environ.get("BATCH_FILES_STORAGE_OPTIONS", "")
                          or json.dumps({"location": os.environ.get("BATCH_FILES_DIR", str(BASE_DIR / "var" / "batch_files"))})),
}

# Email: console backend in development, SMTP from the environment in production.
# Every message is queued to one Celery task (maas/mail.py); the worker delivers it with
# EMAIL_DELIVERY_BACKEND, which the EMAIL_BACKEND environment variable chooses.
EMAIL_BACKEND = "maas.mail.CeleryEmailBackend"
EMAIL_DELIVERY_BACKEND = os.environ.get(
    "EMAIL_BACKEND",
    "django.core.mail.backends.console.EmailBackend" if DEBUG else "django.core.mail.backends.smtp.EmailBackend",
)
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
# For EMAIL_BACKEND=django.core.mail.backends.filebased.EmailBackend (development, tests).
EMAIL_FILE_PATH = os.environ.get("EMAIL_FILE_PATH", str(BASE_DIR / ".maas" / "mail"))
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS")
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL")
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "MaaS <noreply@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL

# Security: safe unless DEBUG is on.
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if env_bool("BEHIND_TLS_PROXY") else None
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
SESSION_COOKIE_HTTPONLY = True
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", default=not DEBUG)
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^metrics$"]
SECURE_HSTS_SECONDS = 0 if DEBUG else env_int("SECURE_HSTS_SECONDS", 31536000)
# Off unless asked for: includeSubDomains and preload bind every subdomain of the console's domain,
# and preload lists are hard to leave. check --deploy's reminders about them are silenced below.
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS") and not DEBUG
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD") and not DEBUG
SILENCED_SYSTEM_CHECKS = ["security.W005", "security.W021"]
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp) on every response: scripts, styles, fonts and images only from
# this origin, no inline script, no plugins, no framing, forms post only here (and to the SSO provider:
# "Continue" posts here and is redirected there).
# CSP_REPORT_URI: where browsers report violations (optional); CSP_REPORT_ONLY=1 to try a change first.
CONTENT_SECURITY_POLICY_DIRECTIVES = {
    "default-src": ["'self'"],
    "script-src": ["'self'"],
    "style-src": ["'self'"],
    "img-src": ["'self'", "data:"],
    "font-src": ["'self'"],
    "connect-src": ["'self'"],
    "object-src": ["'none'"],
    "base-uri": ["'self'"],
    "frame-ancestors": ["'none'"],
    "form-action": ["'self'", *sso_config.provider_origins(SOCIALACCOUNT_PROVIDERS)],
}
if os.environ.get("CSP_REPORT_URI"):
    CONTENT_SECURITY_POLICY_DIRECTIVES["report-uri"] = os.environ["CSP_REPORT_URI"]
if env_bool("CSP_REPORT_ONLY"):
    CONTENT_SECURITY_POLICY_REPORT_ONLY = {"DIRECTIVES": CONTENT_SECURITY_POLICY_DIRECTIVES}
else:
    CONTENT_SECURITY_POLICY = {"DIRECTIVES": CONTENT_SECURITY_POLICY_DIRECTIVES}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["rest_framework.authentication.SessionAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    # One error shape for the whole session API: {"error": {"message", "type", "param", "code"}}.
    "EXCEPTION_HANDLER": "accounts.api_errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The session API's OpenAPI document (/api/schema) and its Swagger UI (/api/docs), served from
# drf-spectacular-sidecar's static files: nothing is loaded from another host.
SPECTACULAR_SETTINGS = {
    "TITLE": "MaaS console API",
    "DESCRIPTION": "The console's session API under /api/: log in to the console, send the CSRF token in "
    "X-CSRFToken on writes. Errors: {\"error\": {\"message\", \"type\", \"param\", \"code\"}}. The "
    "OpenAI-compatible inference API is under /v1/ (API keys).",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Rolling an API key: the longest grace period the old key may keep working (default 30 days).
KEY_ROTATION_MAX_GRACE_SECONDS = env_int("KEY_ROTATION_MAX_GRACE_SECONDS", 30 * 86400)

# Invitations sent (revoked ones count): per inviter per hour, per organization per day.
INVITATIONS_PER_USER_PER_HOUR = env_int("INVITATIONS_PER_USER_PER_HOUR", 20)
INVITATIONS_PER_ORGANIZATION_PER_DAY = env_int("INVITATIONS_PER_ORGANIZATION_PER_DAY", 100)

# Authorization-code redemption brute-force limits: failed attempts per window.
REDEEM_FAILURES_PER_USER = env_int("REDEEM_FAILURES_PER_USER", 5)
REDEEM_FAILURES_PER_IP = env_int("REDEEM_FAILURES_PER_IP", 20)
REDEEM_FAILURE_WINDOW_SECONDS = env_int("REDEEM_FAILURE_WINDOW_SECONDS", 900)

# Gateway (/v1/): upstream timeouts, quota reservations, rate limits, catalog caching.
GATEWAY_UPSTREAM_CONNECT_TIMEOUT = env_float("GATEWAY_UPSTREAM_CONNECT_TIMEOUT", 3.0)
GATEWAY_UPSTREAM_READ_TIMEOUT = env_float("GATEWAY_UPSTREAM_READ_TIMEOUT", 120.0)  # between two chunks
GATEWAY_UPSTREAM_WRITE_TIMEOUT = env_float("GATEWAY_UPSTREAM_WRITE_TIMEOUT", 30.0)
GATEWAY_UPSTREAM_POOL_TIMEOUT = env_float("GATEWAY_UPSTREAM_POOL_TIMEOUT", 10.0)
GATEWAY_UPSTREAM_MAX_CONNECTIONS = env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 1000)
# Idle pooled connections are dropped after this; keep it below the upstream's own idle timeout (our
# engine's --timeout-keep-alive, 75 s by default), so we never write into a connection it is closing.
GATEWAY_UPSTREAM_KEEPALIVE_EXPIRY = env_float("GATEWAY_UPSTREAM_KEEPALIVE_EXPIRY", 30.0)
# A crashed request's reservation is released after this; must exceed the longest request.
GATEWAY_RESERVATION_TTL_SECONDS = env_int("GATEWAY_RESERVATION_TTL_SECONDS", 900)
# Added to the byte-count bound on prompt tokens (chat template, default system prompt).
GATEWAY_PROMPT_OVERHEAD_TOKENS = env_int("GATEWAY_PROMPT_OVERHEAD_TOKENS", 256)
# The Batch API (README "Batch API"): limits, the runner's pace, and how long its files are kept.
BATCH_MAX_FILE_BYTES = env_int("BATCH_MAX_FILE_BYTES", 100 * 1024 * 1024)
BATCH_MAX_LINES = env_int("BATCH_MAX_LINES", 50_000)
BATCH_MAX_ACTIVE_PER_ORGANIZATION = env_int("BATCH_MAX_ACTIVE_PER_ORGANIZATION", 5)
BATCH_LINE_CONCURRENCY = env_int("BATCH_LINE_CONCURRENCY", 4)  # lines of one batch in flight at once
BATCH_QUEUE = os.environ.get("BATCH_QUEUE", "batch")
BATCH_LEASE_SECONDS = env_int("BATCH_LEASE_SECONDS", 60)  # a runner that stops renewing loses its batch after this
BATCH_COMPLETION_WINDOW_SECONDS = env_int("BATCH_COMPLETION_WINDOW_SECONDS", 24 * 3600)
BATCH_FILES_RETENTION_DAYS = env_int("BATCH_FILES_RETENTION_DAYS", 30)
# /v1/responses: stored responses (store: true, the default) are kept this long, then purged.
RESPONSES_RETENTION_DAYS = env_int("RESPONSES_RETENTION_DAYS", 30)
# Count prompts exactly with the tokenizer each replica publishes (inference/prompt_count.py); the byte
# bound above applies only while a replica's tokenizer is unknown.
GATEWAY_EXACT_PROMPT_COUNT = env_bool("GATEWAY_EXACT_PROMPT_COUNT", default=True)
GATEWAY_TOKENIZER_TIMEOUT = env_float("GATEWAY_TOKENIZER_TIMEOUT", 10.0)
GATEWAY_TOKENIZER_RETRY_SECONDS = env_float("GATEWAY_TOKENIZER_RETRY_SECONDS", 60.0)
# A chat request without max_tokens is held (and sent to the engine) with this bound per choice, capped by
# what the context leaves after the counted prompt; 0: hold the whole context instead.
GATEWAY_DEFAULT_MAX_TOKENS = env_int("GATEWAY_DEFAULT_MAX_TOKENS", 4096)
# When the quota's room is held by requests in flight (not used up), wait this long for it to free before
# answering a retryable 429.
GATEWAY_QUOTA_WAIT_SECONDS = env_float("GATEWAY_QUOTA_WAIT_SECONDS", 5.0)
# Percent of a budget (organization or key) spent at which the organization's owners and admins are told,
# once per threshold and limit (inference.tasks.notify_entitlement_thresholds).
BUDGET_ALERT_THRESHOLDS = [int(p) for p in env_list("BUDGET_ALERT_THRESHOLDS", "50,80,100")]
GATEWAY_RATELIMIT_USE_REDIS = env_bool("GATEWAY_RATELIMIT_USE_REDIS", default=bool(REDIS_URL))
GATEWAY_RATELIMIT_ON_REDIS_ERROR = os.environ.get("GATEWAY_RATELIMIT_ON_REDIS_ERROR", "refuse")  # or "local"
# Organizations without their own limits get these (0: no limit, and no x-ratelimit-* headers).
GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE = env_int("GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE", 60_000)
GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE = env_int("GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE", 100_000_000)
GATEWAY_REDIS_TIMEOUT = env_float("GATEWAY_REDIS_TIMEOUT", 0.5)
GATEWAY_CATALOG_CACHE_SECONDS = env_float("GATEWAY_CATALOG_CACHE_SECONDS", 5.0)
GATEWAY_UNHEALTHY_BACKOFF_SECONDS = env_float("GATEWAY_UNHEALTHY_BACKOFF_SECONDS", 10.0)
GATEWAY_HEALTH_CHECK_TIMEOUT = env_float("GATEWAY_HEALTH_CHECK_TIMEOUT", 2.0)
# Replica choice, shared by every gateway process through Redis (inference/routing.py): "affinity"
# (bounded-load consistent hashing on the prompt's prefix), "least_loaded" or "round_robin".
GATEWAY_ROUTING = os.environ.get("GATEWAY_ROUTING", "affinity")
# Bounded loads: a key's home takes a request while its requests in flight stay within this factor times
# the mean (c > 1); above it the request is lent to the key's next replica.
GATEWAY_AFFINITY_LOAD_FACTOR = env_float("GATEWAY_AFFINITY_LOAD_FACTOR", 1.5)
# The prefix that keys affinity: this many characters of the rendered messages (a system prompt, a
# conversation's first turns), with the tenant's cache_salt.
GATEWAY_AFFINITY_PREFIX_CHARS = env_int("GATEWAY_AFFINITY_PREFIX_CHARS", 1024)
# A prefix key keeps its home replica this long after its last request (then it is a new key again).
GATEWAY_AFFINITY_HOLDER_SECONDS = env_float("GATEWAY_AFFINITY_HOLDER_SECONDS", 600.0)
# A new key's home: the first replica in its order with fewer than this factor times the mean keys.
GATEWAY_AFFINITY_KEY_FACTOR = env_float("GATEWAY_AFFINITY_KEY_FACTOR", 1.0)
# How often one gateway process (whichever takes the Redis lock) polls the engines' GET /load.
GATEWAY_LOAD_POLL_SECONDS = env_float("GATEWAY_LOAD_POLL_SECONDS", 1.0)
# An attempt that has no response headers after this long fails over (fallback models, next replica).
GATEWAY_FIRST_BYTE_TIMEOUT = env_float("GATEWAY_FIRST_BYTE_TIMEOUT", 120.0)
# Quota holds and settlements commit without waiting for the WAL flush (see inference/quotas.py).
GATEWAY_ASYNC_COMMIT = env_bool("GATEWAY_ASYNC_COMMIT", default=True)
GATEWAY_DB_THREADS = env_int("GATEWAY_DB_THREADS", 4)  # per process, for the admission and settlement
# PostgreSQL: admission and settlement on asyncio psycopg (no worker-thread hops), with a pool of its own.
GATEWAY_ASYNC_DB = env_bool("GATEWAY_ASYNC_DB", default=True)
GATEWAY_ASYNC_DB_POOL_SIZE = env_int("GATEWAY_ASYNC_DB_POOL_SIZE", 20)
GATEWAY_ASYNC_DB_TIMEOUT = env_float("GATEWAY_ASYNC_DB_TIMEOUT", 5.0)

# Hosts (names) and networks engine deployments may point at (checked on save and on each health check);
# "*" allows any. Default: loopback and private networks (compose's engine services, a LAN of GPU hosts).
DEPLOYMENT_ALLOWED_UPSTREAMS = env_list(
    "DEPLOYMENT_ALLOWED_UPSTREAMS", "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
)

# Model sources and platform-run replicas (inference/sources.py, inference/launcher.py, README *Running models
# from the admin*). MODELS_DIR: the directory the admin lists models from (empty: only the demo packages);
# nothing outside it (after resolving symlinks) is ever served.
MODELS_DIR = os.environ.get("MODELS_DIR", "")
# Engines the launcher starts listen on LAUNCHER_BIND_HOST and are registered as http://LAUNCHER_HOST:PORT
# (compose: 0.0.0.0 and the launcher service's name), PORT from LAUNCHER_PORT_RANGE.
LAUNCHER_BIND_HOST = os.environ.get("LAUNCHER_BIND_HOST", "127.0.0.1")
LAUNCHER_HOST = os.environ.get("LAUNCHER_HOST", LAUNCHER_BIND_HOST)
LAUNCHER_PORT_RANGE = tuple(int(p) for p in os.environ.get("LAUNCHER_PORT_RANGE", "8200-8299").split("-", 1))
# Where the launcher keeps each engine's log file.
LAUNCHER_STATE_DIR = os.environ.get("LAUNCHER_STATE_DIR", str(BASE_DIR / "var" / "launcher"))
LAUNCHER_POLL_SECONDS = env_float("LAUNCHER_POLL_SECONDS", 2.0)
LAUNCHER_STARTUP_TIMEOUT = env_float("LAUNCHER_STARTUP_TIMEOUT", 600.0)
# Extra `python -m engine serve` arguments for every engine it starts, e.g. "--threads 4 --log-level warning".
LAUNCHER_ENGINE_ARGS = os.environ.get("LAUNCHER_ENGINE_ARGS", "")

# GET /metrics (Prometheus) needs `Authorization: Bearer <METRICS_TOKEN>`; empty: /metrics answers 404.
METRICS_TOKEN = os.environ.get("METRICS_TOKEN", "")

# Celery: a real broker when configured, tasks run in-process otherwise.
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", "")
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", default=not CELERY_BROKER_URL)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_TASK_DEFAULT_QUEUE", "maas")
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# Batch lines run on their own queue, served by workers of their own (`celery -A maas worker -Q batch`),
# so interactive traffic's tasks never wait behind a batch.
CELERY_TASK_ROUTES = {"inference.tasks.run_batch": {"queue": BATCH_QUEUE}}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = os.environ.get("CELERY_BEAT_SCHEDULE_FILENAME", "celerybeat-schedule")
# Periods in seconds; `expires` drops a run that waited longer than its period (the next one is due).
CELERY_BEAT_SCHEDULE = {
    "check-deployments": {
        "task": "inference.tasks.check_deployments",
        "schedule": env_float("DEPLOYMENT_HEALTH_CHECK_SECONDS", 15),
        "options": {"expires": env_float("DEPLOYMENT_HEALTH_CHECK_SECONDS", 15)},
    },
    "expire-reservations": {
        "task": "inference.tasks.expire_reservations",
        "schedule": env_float("RESERVATION_SWEEP_SECONDS", 60),
        "options": {"expires": env_float("RESERVATION_SWEEP_SECONDS", 60)},
    },
    "rollup-daily-usage": {
        "task": "inference.tasks.rollup_daily_usage",
        "schedule": env_float("USAGE_ROLLUP_SECONDS", 600),
        "options": {"expires": env_float("USAGE_ROLLUP_SECONDS", 600)},
    },
    "notify-entitlement-thresholds": {
        "task": "inference.tasks.notify_entitlement_thresholds",
        "schedule": env_float("ENTITLEMENT_NOTICE_SECONDS", 3600),
    },
    "resume-batches": {
        "task": "inference.tasks.resume_batches",
        "schedule": env_float("BATCH_RESUME_SECONDS", 60),
        "options": {"expires": env_float("BATCH_RESUME_SECONDS", 60)},
    },
    "purge-expired-files": {
        "task": "inference.tasks.purge_expired_files",
        "schedule": env_float("BATCH_FILES_PURGE_SECONDS", 3600),
        "options": {"expires": env_float("BATCH_FILES_PURGE_SECONDS", 3600)},
    },
    "purge-expired-responses": {
        "task": "inference.tasks.purge_expired_responses",
        "schedule": env_float("RESPONSES_PURGE_SECONDS", 3600),
        "options": {"expires": env_float("RESPONSES_PURGE_SECONDS", 3600)},
    },
}

# Logs: one JSON object per line with request_id, trace_id and span_id (maas/logging.py);
# LOG_FORMAT=text for a human-readable console in development.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "text" if DEBUG else "json")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_context": {"()": "maas.logging.RequestContextFilter"}},
    "formatters": {
        "json": {"()": "maas.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(trace_id)s] %(message)s"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "filters": ["request_context"], "formatter": LOG_FORMAT}
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
}
