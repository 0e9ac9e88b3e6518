from django.conf import settings


def test_settings_come_from_environment():
    assert settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql"
    assert settings.AUTH_USER_MODEL == "accounts.User"
    assert not settings.DEBUG
