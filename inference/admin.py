from django import forms
from django.contrib import admin

from .catalog import catalog
from .models import AIModel, Deployment, Reservation, UsageRecord


class DeploymentForm(forms.ModelForm):
    """The engine token is write-only: never rendered back, kept when left empty, replaced when typed."""

    internal_token = forms.CharField(
        required=False, strip=True, label="Internal token",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Sent upstream as a Bearer token. Never shown; leave empty to keep the current one.",
    )
    clear_internal_token = forms.BooleanField(required=False, label="Remove the internal token")

    class Meta:
        model = Deployment
        fields = ["model", "base_url", "served_model_name", "internal_token", "weight", "enabled"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk and self.instance.internal_token:
            self.fields["internal_token"].widget.attrs["placeholder"] = "•••••• (set)"

    def clean_internal_token(self) -> str:
        typed = self.cleaned_data.get("internal_token", "")
        return typed or (self.instance.internal_token if self.instance.pk else "")

    def clean(self):
        data = super().clean()
        if data.get("clear_internal_token"):
            data["internal_token"] = ""
        return data


class DeploymentInline(admin.TabularInline):
    model = Deployment
    form = DeploymentForm
    extra = 0
    fields = ["base_url", "served_model_name", "internal_token", "clear_internal_token", "weight", "enabled", "healthy",
              "last_checked_at", "last_error"]
    readonly_fields = ["healthy", "last_checked_at", "last_error"]


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = ["name", "display_name", "kind", "context_length", "enabled", "visibility",
                    "price_input_per_million", "price_cached_input_per_million", "price_output_per_million"]
    list_filter = ["enabled", "visibility", "kind"]
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
    form = DeploymentForm
    fields = ["model", "base_url", "served_model_name", "internal_token", "clear_internal_token", "weight", "enabled",
              "healthy", "last_checked_at", "last_error"]
    readonly_fields = ["healthy", "last_checked_at", "last_error"]
    actions = ["check_health"]

    @admin.action(description="Check health now", permissions=["change"])
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

    def has_delete_permission(self, request, obj=None):
        return False  # append-only: corrections are new adjusting rows


@admin.register(Reservation)
class ReservationAdmin(admin.ModelAdmin):
    list_display = ["request_id", "organization", "entitlement", "tokens", "created_at", "expires_at"]
    list_filter = ["expires_at"]
    search_fields = ["request_id", "organization__slug"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # deleting one would leave its tokens reserved; the sweeper releases expired holds
