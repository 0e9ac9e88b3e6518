"""SSO in the admin: identity providers come from the environment only (no SocialApp page; the adapter
ignores database rows, see SocialAccountAdapter.list_apps), tokens are not stored, and a connection
between a person and their provider identity can be looked at or removed but never made or re-pointed
(changing `user` or `uid` would hand one person's sign-in to another)."""

from __future__ import annotations

from allauth.socialaccount.admin import SocialAccountAdmin as BaseSocialAccountAdmin
from allauth.socialaccount.models import SocialAccount, SocialApp, SocialToken
from django.contrib import admin

for model in (SocialApp, SocialToken, SocialAccount):
    if admin.site.is_registered(model):
        admin.site.unregister(model)


@admin.register(SocialAccount)
class SocialAccountAdmin(BaseSocialAccountAdmin):
    readonly_fields = ("user", "provider", "uid", "extra_data", "last_login", "date_joined")

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False
