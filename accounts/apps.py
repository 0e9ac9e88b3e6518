from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and tenancy"

    def ready(self) -> None:
        from . import signals, sso  # noqa: F401  (keys follow their people; SSO connections join organizations)
        from .audit import install_command_hook

        install_command_hook()
