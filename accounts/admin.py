"""Django admin for users, organizations, memberships, invitations and API keys.

Authorization codes and entitlements live in accounts/admin_codes.py.
"""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.auth.admin import GroupAdmin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.contrib.auth.forms import AdminUserCreationForm, UserChangeForm
from django.contrib.auth.models import Group
from django.utils import timezone

from .models import APIKey, Invitation, Membership, Organization, User


class UserCreationForm(AdminUserCreationForm):
    class Meta:
        model = User
        fields = ("email",)


class UserEditForm(UserChangeForm):
    class Meta:
        model = User
        fields = "__all__"


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]
    fields = ["user", "role", "created_at"]
    readonly_fields = ["created_at"]


class UserMembershipInline(MembershipInline):
    autocomplete_fields = ["organization"]
    fields = ["organization", "role", "created_at"]


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    form = UserEditForm
    add_form = UserCreationForm
    ordering = ["email"]
    list_display = ["email", "first_name", "last_name", "is_active", "is_staff", "date_joined", "last_login"]
    list_filter = ["is_active", "is_staff", "is_superuser", "date_joined"]
    search_fields = ["email", "first_name", "last_name", "memberships__organization__slug"]
    inlines = [UserMembershipInline]
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Personal info", {"fields": ("first_name", "last_name")}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups", "user_permissions")}),
        ("Important dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "usable_password", "password1", "password2")}),)

    # Only superusers hand out staff status, superuser status, groups and permissions; other staff
    # see and edit the rest, and cannot touch staff accounts other than their own (nor their password).
    PRIVILEGE_FIELDS = ("is_staff", "is_superuser", "groups", "user_permissions")

    def get_fieldsets(self, request, obj=None):
        fieldsets = super().get_fieldsets(request, obj)
        if request.user.is_superuser:
            return fieldsets
        return tuple(
            (name, {**options, "fields": tuple(f for f in options["fields"] if f not in self.PRIVILEGE_FIELDS)})
            for name, options in fieldsets
        )

    def _may_touch(self, request, obj) -> bool:
        if obj is None or request.user.is_superuser:
            return True
        return not obj.is_superuser and (not obj.is_staff or obj.pk == request.user.pk)

    def has_change_permission(self, request, obj=None) -> bool:
        return super().has_change_permission(request, obj) and self._may_touch(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return super().has_delete_permission(request, obj) and self._may_touch(request, obj)


class SuperuserOnlyGroupAdmin(GroupAdmin):
    """Groups carry permissions: editing one is granting them, which only superusers may do."""

    def has_module_permission(self, request) -> bool:
        return request.user.is_superuser

    def has_view_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser

    def has_add_permission(self, request) -> bool:
        return request.user.is_superuser

    def has_change_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser

    def has_delete_permission(self, request, obj=None) -> bool:
        return request.user.is_superuser


admin.site.unregister(Group)
admin.site.register(Group, SuperuserOnlyGroupAdmin)


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_active", "member_count", "requests_per_minute", "tokens_per_minute", "created_at"]
    list_filter = ["is_active", "created_at"]
    search_fields = ["slug", "name", "memberships__user__email"]
    readonly_fields = ["cache_salt", "created_at"]
    prepopulated_fields = {"slug": ("name",)}
    inlines = [MembershipInline]

    @admin.display(description="Members")
    def member_count(self, obj: Organization) -> int:
        return obj.memberships.count()


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "organization", "role", "created_at"]
    list_filter = ["role", "created_at"]
    search_fields = ["user__email", "organization__slug", "organization__name"]
    autocomplete_fields = ["user", "organization"]
    list_select_related = ["user", "organization"]


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    list_display = ["email", "organization", "role", "invited_by", "created_at", "expires_at", "state"]
    list_filter = ["role", ("accepted_at", admin.EmptyFieldListFilter), ("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["email", "organization__slug", "invited_by__email"]
    readonly_fields = ["organization", "email", "role", "invited_by", "created_at", "expires_at", "accepted_at"]
    fields = [*readonly_fields, "revoked_at"]
    list_select_related = ["organization", "invited_by"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False  # Invitations carry an emailed token: they are created from the console.

    @admin.display(description="State")
    def state(self, obj: Invitation) -> str:
        if obj.accepted_at:
            return "accepted"
        if obj.revoked_at:
            return "revoked"
        return "expired" if obj.expires_at <= timezone.now() else "pending"

    @admin.action(description="Revoke selected invitations", permissions=["change"])
    def revoke(self, request, queryset):
        count = queryset.filter(accepted_at__isnull=True, revoked_at__isnull=True).update(revoked_at=timezone.now())
        self.message_user(request, f"Revoked {count} invitation(s).", messages.SUCCESS)


class APIKeyStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("active", "Active"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        now = timezone.now()
        if self.value() == "revoked":
            return queryset.filter(revoked_at__isnull=False)
        if self.value() == "expired":
            return queryset.filter(revoked_at__isnull=True, expires_at__lte=now)
        if self.value() == "active":
            return queryset.filter(revoked_at__isnull=True).exclude(expires_at__lte=now)
        return queryset


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin):
    """Keys are made in the console or with `create_api_key` (the only places the secret can be shown);
    here they can be inspected, limited and revoked. The hash is never shown or editable."""

    list_display = ["name", "redacted", "organization", "created_by", "created_at", "last_used_at", "expires_at", "status"]
    list_filter = [APIKeyStatusFilter, "created_at", "last_used_at", "organization"]
    search_fields = ["name", "public_id", "organization__slug", "organization__name", "created_by__email"]
    list_select_related = ["organization", "created_by"]
    readonly_fields = ["redacted", "organization", "created_by", "created_at", "last_used_at", "revoked_at"]
    fields = [
        "redacted", "name", "organization", "created_by", "created_at", "last_used_at", "expires_at",
        "allowed_models", "requests_per_minute", "tokens_per_minute", "revoked_at",
    ]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="Key")
    def redacted(self, obj: APIKey) -> str:
        return obj.redacted

    @admin.display(description="Status")
    def status(self, obj: APIKey) -> str:
        return obj.status

    @admin.action(description="Revoke selected keys (effective immediately)", permissions=["change"])
    def revoke(self, request, queryset):
        keys = list(queryset.filter(revoked_at__isnull=True))
        for key in keys:
            key.revoke()
        self.message_user(request, f"Revoked {len(keys)} key(s).", messages.SUCCESS)


from . import admin_codes, admin_sso  # noqa: E402,F401  (codes and entitlements; single sign-on connections)
