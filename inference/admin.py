from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.template.response import TemplateResponse
from django.urls import path
from django.utils.http import urlencode

from . import replicas, sources
from .catalog import catalog
from .models import AIModel, Budget, Deployment, ModelFallback, Replica, Reservation, UsageRecord

OPERATE_REPLICAS = "inference.operate_replica"


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


class OperateReplicasMixin:
    """Starting, stopping and restarting engine processes takes the dedicated permission, not just staff."""

    def has_operate_permission(self, request) -> bool:
        return request.user.has_perm(OPERATE_REPLICAS)


@admin.register(AIModel)
class AIModelAdmin(OperateReplicasMixin, admin.ModelAdmin):
    list_display = ["name", "display_name", "kind", "context_length", "enabled", "visibility",
                    "price_input_per_million", "price_cached_input_per_million", "price_output_per_million"]
    list_filter = ["enabled", "visibility", "kind"]
    search_fields = ["name", "display_name", "description"]
    filter_horizontal = ["organizations"]
    inlines = [DeploymentInline, ModelFallbackInline]
    readonly_fields = ["platform_replicas"]
    actions = ["start_replica"]
    change_list_template = "admin/inference/aimodel/change_list.html"

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        catalog.invalidate()

    @admin.display(description="Platform-run replicas")
    def platform_replicas(self, obj: AIModel):
        """Read-only here (a form, not a formset: posting the model form needs nothing more); options and
        actions are on *Replicas*."""
        from django.urls import reverse
        from django.utils.html import format_html, format_html_join

        if obj.pk is None or not obj.replicas.exists():
            return "-"
        return format_html("<ul>{}</ul>", format_html_join("", '<li><a href="{}">{}</a>: {} (wanted {}){}</li>', (
            (reverse("admin:inference_replica_change", args=[r.pk]), r, r.get_status_display(), r.desired,
             f" — {r.last_error}" if r.last_error else "")
            for r in obj.replicas.all())))

    @admin.action(description="Start a replica (the launcher runs it)", permissions=["operate"])
    def start_replica(self, request, queryset):
        for model in queryset:
            try:
                replica = replicas.start_replica(model)
            except (replicas.ReplicaError, ValidationError) as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Started {replica}: the launcher starts its engine (see Replicas).")

    def get_urls(self):
        view = self.admin_site.admin_view(self.sources_view)
        return [path("sources/", view, name="inference_aimodel_sources"), *super().get_urls()]

    def sources_view(self, request):
        """What can be served from MODELS_DIR and the demo packages, each with a pre-filled *Add* link."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        found, refused = sources.list_sources()
        in_catalog = {}
        for name, source in AIModel.objects.exclude(source="").values_list("name", "source"):
            in_catalog.setdefault(source, []).append(name)
        rows = [
            {"source": source, "models": in_catalog.get(source.id, []),
             "add_query": urlencode(replicas.model_defaults(source))}
            for source in found
        ]
        context = {
            **self.admin_site.each_context(request), "opts": self.model._meta, "title": "Model sources",
            "rows": rows, "refused": refused, "models_dir": sources.models_dir(),
        }
        return TemplateResponse(request, "admin/inference/aimodel/sources.html", context)


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


class ReplicaForm(forms.ModelForm):
    class Meta:
        model = Replica
        fields = ["model", "dtype", "quantization", "device", "kv_cache_memory", "max_num_seqs", "max_model_len"]

    def clean_model(self):
        model = self.cleaned_data["model"]
        try:
            replicas.check_servable(model)
        except replicas.ReplicaError as exc:
            raise ValidationError(str(exc)) from None
        return model


@admin.register(Replica)
class ReplicaAdmin(OperateReplicasMixin, admin.ModelAdmin):
    """Engine options are fields; desired state changes only through the actions (audited with who did it).
    Every change here needs the operate_replica permission: it starts or stops processes."""

    list_display = ["__str__", "model", "desired", "status", "device", "dtype", "port", "pid", "restarts",
                    "endpoint", "last_seen_at"]
    list_filter = ["desired", "status", "model"]
    list_select_related = ["model", "deployment"]
    fields = ["model", "dtype", "quantization", "device", "kv_cache_memory", "max_num_seqs", "max_model_len", "desired",
              "generation", "status", "endpoint", "pid", "restarts", "started_at", "last_seen_at", "last_error",
              "log"]
    readonly_fields = ["desired", "generation", "status", "endpoint", "pid", "restarts", "started_at",
                       "last_seen_at", "last_error", "log"]
    actions = ["start", "stop", "restart"]
    form = ReplicaForm

    def has_add_permission(self, request):
        return self.has_operate_permission(request)

    def has_change_permission(self, request, obj=None):
        return self.has_operate_permission(request)

    def has_delete_permission(self, request, obj=None):
        return self.has_operate_permission(request)

    def get_readonly_fields(self, request, obj=None):
        return [*self.readonly_fields, "model"] if obj is not None else self.readonly_fields

    @admin.display(description="Endpoint")
    def endpoint(self, obj: Replica) -> str:
        return obj.deployment.base_url if obj.deployment else "-"

    @admin.display(description="Log (last lines)")
    def log(self, obj: Replica):
        from django.utils.html import format_html

        return format_html('<pre style="max-height: 30em; overflow: auto">{}</pre>', obj.log_tail or "-")

    @admin.action(description="Start selected replicas", permissions=["operate"])
    def start(self, request, queryset):
        try:
            count = replicas.start_replicas(queryset)
        except replicas.ReplicaError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return
        self.message_user(request, f"{count} replicas to start.")

    @admin.action(description="Stop selected replicas (out of routing, then the process ends)", permissions=["operate"])
    def stop(self, request, queryset):
        count = replicas.stop_replicas(queryset)
        self.message_user(request, f"{count} replicas to stop.")

    @admin.action(description="Restart selected replicas (a fresh engine process)", permissions=["operate"])
    def restart(self, request, queryset):
        count = replicas.restart_replicas(queryset)
        self.message_user(request, f"{count} replicas to restart.")


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


class BudgetForm(forms.ModelForm):
    """A budget's limit, validated like an entitlement's quota: never below what is spent and held now."""

    class Meta:
        model = Budget
        fields = ["organization", "api_key", "limit"]

    def clean_limit(self):
        limit = self.cleaned_data.get("limit")
        if limit is None:
            return limit
        # The counters as they are now (the gateway moves them while the form is open).
        current = Budget.objects.get(pk=self.instance.pk) if self.instance.pk else Budget()
        if refusal := current.limit_refusal(limit):
            raise forms.ValidationError(refusal)
        return limit

    def clean(self):
        data = super().clean()
        key, organization = data.get("api_key"), data.get("organization")
        if key is not None and organization is not None and key.organization_id != organization.pk:
            self.add_error("api_key", "This key belongs to another organization.")
        return data


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Spending limits in USD: the organization's (no key) or one key's. The gateway holds each request's
    worst-case cost on them and settles the actual cost; alerts go out at BUDGET_ALERT_THRESHOLDS."""

    form = BudgetForm
    list_display = ["organization", "api_key", "limit", "spent", "reserved", "created_at"]
    search_fields = ["organization__slug", "organization__name", "api_key__name"]
    list_select_related = ["organization", "api_key"]
    raw_id_fields = ["organization", "api_key"]
    readonly_fields = ["spent", "reserved", "created_at"]

    def get_readonly_fields(self, request, obj=None):
        # Whose budget it is never changes (its spending belongs to it).
        return self.readonly_fields + (["organization", "api_key"] if obj is not None else [])

    def save_model(self, request, obj, form, change):
        """An edit writes only the limit: the counters the gateway moves meanwhile are never written back
        from the form's stale copy."""
        if change:
            obj.save(update_fields=["limit"])
        else:
            obj.save()
