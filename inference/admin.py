from django import forms
from django.contrib import admin

from .catalog import catalog
from .models import AIModel, Deployment, ModelFallback, Reservation, UsageRecord


class DeploymentForm(forms.ModelForm):
    """The engine token and an external upstream's API key are write-only: never rendered back, kept when
    left empty, replaced when typed (the key is stored encrypted: inference/secrets.py)."""

    internal_token = forms.CharField(
        required=False, strip=True, label="Internal token",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Sent upstream as a Bearer token. Never shown; leave empty to keep the current one.",
    )
    clear_internal_token = forms.BooleanField(required=False, label="Remove the internal token")
    api_key = forms.CharField(
        required=False, strip=True, label="Upstream API key",
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="An external server's key, stored encrypted and sent instead of the internal token. Never shown; "
                  "leave empty to keep the current one.",
    )
    clear_api_key = forms.BooleanField(required=False, label="Remove the upstream API key")

    class Meta:
        model = Deployment
        fields = ["model", "base_url", "served_model_name", "kind", "internal_token", "weight", "enabled", "draining",
                  "supports_cache_salt", "supports_tokenize", "supports_tokenizer"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk and self.instance.internal_token:
            self.fields["internal_token"].widget.attrs["placeholder"] = "•••••• (set)"
        if "api_key" in self.fields and self.instance.pk and self.instance.api_key_encrypted:
            self.fields["api_key"].widget.attrs["placeholder"] = "•••••• (set)"

    def clean_internal_token(self) -> str:
        typed = self.cleaned_data.get("internal_token", "")
        return typed or (self.instance.internal_token if self.instance.pk else "")

    def clean(self):
        data = super().clean()
        if data.get("clear_internal_token"):
            data["internal_token"] = ""
        return data

    def save(self, commit: bool = True) -> Deployment:
        if self.cleaned_data.get("clear_api_key"):
            self.instance.api_key = ""
        elif self.cleaned_data.get("api_key"):
            self.instance.api_key = self.cleaned_data["api_key"]
        return super().save(commit)


DEPLOYMENT_FIELDS = ["base_url", "served_model_name", "kind", "internal_token", "clear_internal_token", "api_key",
                     "clear_api_key", "supports_cache_salt", "supports_tokenize", "supports_tokenizer", "weight",
                     "enabled", "draining", "healthy", "last_checked_at", "last_error"]


class DeploymentInline(admin.TabularInline):
    model = Deployment
    form = DeploymentForm
    extra = 0
    fields = DEPLOYMENT_FIELDS
    readonly_fields = ["healthy", "last_checked_at", "last_error"]


class ModelFallbackInline(admin.TabularInline):
    model = ModelFallback
    fk_name = "model"
    extra = 0
    fields = ["fallback", "position"]
    verbose_name = "fallback model"


@admin.register(AIModel)
class AIModelAdmin(admin.ModelAdmin):
    list_display = ["name", "display_name", "kind", "context_length", "enabled", "visibility",
                    "price_input_per_million", "price_cached_input_per_million", "price_output_per_million"]
    list_filter = ["enabled", "visibility", "kind"]
    search_fields = ["name", "display_name", "description"]
    filter_horizontal = ["organizations"]
    inlines = [DeploymentInline, ModelFallbackInline]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        catalog.invalidate()


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["model", "base_url", "kind", "weight", "enabled", "draining", "healthy", "last_checked_at"]
    list_filter = ["enabled", "draining", "healthy", "kind", "model"]
    search_fields = ["base_url", "model__name"]
    form = DeploymentForm
    fields = ["model", *DEPLOYMENT_FIELDS]
    readonly_fields = ["healthy", "last_checked_at", "last_error"]
    actions = ["check_health", "start_draining", "stop_draining"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        catalog.invalidate()

    @admin.action(description="Drain: new requests avoid it, running ones finish", permissions=["change"])
    def start_draining(self, request, queryset):
        self._set_draining(request, queryset, True)

    @admin.action(description="Stop draining", permissions=["change"])
    def stop_draining(self, request, queryset):
        self._set_draining(request, queryset, False)

    def _set_draining(self, request, queryset, draining: bool) -> None:
        changed = 0
        for deployment in queryset:  # save(): the audit log records each change
            if deployment.draining != draining:
                deployment.draining = draining
                deployment.save(update_fields=["draining"])
                changed += 1
        catalog.invalidate()
        self.message_user(request, f"{changed} deployment(s) {'now draining' if draining else 'no longer draining'}.")

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
