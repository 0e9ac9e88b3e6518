from django.contrib import admin

from .catalog import catalog
from .models import AIModel, Deployment, Reservation, UsageRecord


class DeploymentInline(admin.TabularInline):
    model = Deployment
    extra = 0
    fields = ["base_url", "served_model_name", "internal_token", "weight", "enabled", "healthy", "last_checked_at", "last_error"]
    readonly_fields = ["healthy", "last_checked_at", "last_error"]


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = ["name", "display_name", "context_length", "enabled", "visibility",
                    "price_input_per_million", "price_cached_input_per_million", "price_output_per_million"]
    list_filter = ["enabled", "visibility"]
    search_fields = ["name", "display_name", "description"]
    filter_horizontal = ["organizations"]
    inlines = [DeploymentInline]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        catalog.invalidate()


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["model", "base_url", "weight", "enabled", "healthy", "last_checked_at"]
    list_filter = ["enabled", "healthy", "model"]
    search_fields = ["base_url", "model__name"]
    readonly_fields = ["healthy", "last_checked_at", "last_error"]
    actions = ["check_health"]

    @admin.action(description="Check health now")
    def check_health(self, request, queryset):
        import httpx

        from .catalog import check_deployment

        with httpx.Client(timeout=5) as client:
            healthy = sum(check_deployment(d, client) for d in queryset)
        self.message_user(request, f"{healthy} of {queryset.count()} deployments healthy.")


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = ["created_at", "organization", "model_name", "status", "prompt_tokens", "cached_tokens",
                    "completion_tokens", "cost", "stream", "latency_ms", "request_id"]
    list_filter = ["status", "stream", "model_name", "created_at"]
    search_fields = ["request_id", "organization__slug", "organization__name", "api_key__name", "model_name"]
    date_hierarchy = "created_at"
    list_select_related = ["organization"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    list_display = ["request_id", "organization", "entitlement", "tokens", "created_at", "expires_at"]
    list_filter = ["expires_at"]
    search_fields = ["request_id", "organization__slug"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
