"""Settings for the test run: the machine's real PostgreSQL and Redis unless the environment says otherwise.

The environment defaults are set before the project settings are read, so a bare `pytest` runs like `make test`.
"""

import os
import tempfile

os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
os.environ.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
os.environ.setdefault("API_KEY_HMAC_SECRET", "test-hmac-secret-not-for-production")
os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
os.environ.setdefault("SECURE_SSL_REDIRECT", "0")
os.environ.setdefault("EMAIL_BACKEND", "django.core.mail.backends.locmem.EmailBackend")
os.environ.setdefault("CELERY_TASK_ALWAYS_EAGER", "1")
# The Batch API's files of this run (processes it starts inherit the directory).
os.environ.setdefault("BATCH_FILES_DIR", tempfile.mkdtemp(prefix="maas-test-batch-files-"))

from maas.settings import *  # noqa: E402,F403

# Templates render {% static %} without a collectstatic run (production keeps the manifest storage;
# tests/accounts/test_console.py runs collectstatic with it).
STORAGES = {**STORAGES, "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"}}  # noqa: F405
WHITENOISE_USE_FINDERS = True

# Hash test users' passwords fast (tests/hashers.py); the production hashers stay listed for verifying.
from django.conf import global_settings  # noqa: E402

PASSWORD_HASHERS = ["tests.hashers.FastPBKDF2PasswordHasher", *global_settings.PASSWORD_HASHERS]
