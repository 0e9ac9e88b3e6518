"""Django admin for authorization codes and entitlements: generate a batch (shown once, CSV download),
filter and search, revoke. Hashes are read-only; codes and entitlements are revoked, never deleted."""

from __future__ import annotations

import base64
import csv
import io

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.core.exceptions import PermissionDenied
from django.db.models import F, Q
from django.http import HttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone

from . import codes
from .forms_codes import IssueCodesForm
from .models import AuthorizationCode, Entitlement

CSV_HEADER = ["code", "prefix", "batch", "token_quota", "validity_days", "models", "max_redemptions", "expires_at", "note"]


def batch_csv(issued: list[codes.IssuedCode]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    for item in issued:
        c = item.code
        writer.writerow([
            item.raw, c.prefix, c.batch, "" if c.token_quota is None else c.token_quota,
            "" if c.validity_days is None else c.validity_days, ",".join(c.model_names), c.max_redemptions,
            c.expires_at.isoformat() if c.expires_at else "", c.note,
        ])
    return out.getvalue()


def log(request, objects, flag: int, message: str) -> None:
    """One admin history entry per object (bulk insert), so operators see who issued or revoked what."""
    if objects:
        LogEntry.objects.log_actions(request.user.pk, objects, flag, message)


class CodeStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [("usable", "Redeemable"), ("used_up", "Used up"), ("expired", "Expired"), ("revoked", "Revoked")]

    def queryset(self, request, queryset):
        now = timezone.now()
        not_expired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        match self.value():
            case "usable":
                return queryset.filter(not_expired, revoked_at__isnull=True, redemption_count__lt=F("max_redemptions"))
            case "used_up":
                return queryset.filter(redemption_count__gte=F("max_redemptions"))
            case "expired":
                return queryset.filter(expires_at__lte=now)
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
        return queryset


def code_status(code: AuthorizationCode) -> str:
    if code.revoked_at is not None:
        return "revoked"
    if code.expires_at is not None and code.expires_at <= timezone.now():
        return "expired"
    if code.redemption_count >= code.max_redemptions:
        return "used up"
    return "redeemable"


class EntitlementInline(admin.TabularInline):
    model = Entitlement
    fields = ("organization", "token_quota", "tokens_used", "starts_at", "ends_at", "revoked_at")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = "Entitlements granted by this code"

    def has_add_permission(self, request, obj=None):
        return False


class AuthorizationCodeForm(forms.ModelForm):
    class Meta:
        model = AuthorizationCode
        fields = ["max_redemptions", "expires_at", "note"]

    def clean_max_redemptions(self):
        value = self.cleaned_data["max_redemptions"]
        if self.instance.pk and value < self.instance.redemption_count:
            raise forms.ValidationError(
                f"This code was already redeemed {self.instance.redemption_count} times; it cannot allow fewer."
            )
        return value


@admin.register(AuthorizationCode)
class AuthorizationCodeAdmin(admin.ModelAdmin):
    form = AuthorizationCodeForm
    list_display = (
        "prefix_display", "status", "redemptions", "token_quota", "validity_days", "models", "expires_at",
        "revoked_at", "note", "created_by", "created_at",
    )
    list_filter = (CodeStatusFilter, "created_at", "expires_at", "max_redemptions", "validity_days")
    search_fields = ("prefix", "note", "created_by__email", "entitlements__organization__slug", "entitlements__organization__name")
    search_help_text = "Prefix (mac-xxxxxxxx), note, issuer's email, or slug/name of a redeeming organization."
    readonly_fields = (
        "prefix", "code_hash", "batch", "token_quota", "validity_days", "model_names", "redemption_count",
        "revoked_at", "created_by", "created_at",
    )
    fields = (
        "prefix", "code_hash", "batch", "token_quota", "validity_days", "model_names", "max_redemptions",
        "redemption_count", "expires_at", "revoked_at", "note", "created_by", "created_at",
    )
    inlines = [EntitlementInline]
    actions = ["revoke_codes", "revoke_codes_and_entitlements"]
    date_hierarchy = "created_at"
    list_select_related = ("created_by",)

    @admin.display(description="code", ordering="prefix")
    def prefix_display(self, obj: AuthorizationCode) -> str:
        return f"{obj.prefix}-…"

    @admin.display(description="status")
    def status(self, obj: AuthorizationCode) -> str:
        return code_status(obj)

    @admin.display(description="redeemed", ordering="redemption_count")
    def redemptions(self, obj: AuthorizationCode) -> str:
        return f"{obj.redemption_count} / {obj.max_redemptions}"

    @admin.display(description="models")
    def models(self, obj: AuthorizationCode) -> str:
        return ", ".join(obj.model_names) or "all"

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: codes stay as the record of what was granted

    def add_view(self, request, form_url="", extra_context=None):
        """Codes are only ever made by the generator, which can show the raw codes once."""
        return redirect("admin:accounts_authorizationcode_generate")

    def get_urls(self):
        urls = [path("generate/", self.admin_site.admin_view(self.generate_view), name="accounts_authorizationcode_generate")]
        return urls + super().get_urls()

    def generate_view(self, request):
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = IssueCodesForm(request.POST or None)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.model._meta,
            "title": "Generate authorization codes",
            "form": form,
            "issued": None,
        }
        if request.method == "POST" and form.is_valid():
            issued = form.issue(created_by=request.user)
            log(request, [item.code for item in issued], ADDITION, f"Generated in batch {issued[0].code.batch}")
            content = batch_csv(issued)
            filename = f"authorization-codes-{issued[0].code.batch}.csv"
            if "_csv" in request.POST:
                response = HttpResponse(content, content_type="text/csv; charset=utf-8")
                response["Content-Disposition"] = f'attachment; filename="{filename}"'
            else:
                context.update(
                    issued=issued,
                    batch=issued[0].code.batch,
                    csv_filename=filename,
                    csv_data_uri="data:text/csv;charset=utf-8;base64," + base64.b64encode(content.encode()).decode(),
                    title=f"{len(issued)} new authorization codes",
                )
                response = TemplateResponse(request, "admin/accounts/authorizationcode/generate.html", context)
            response["Cache-Control"] = "no-store"  # the raw codes exist in this one response only
            return response
        return TemplateResponse(request, "admin/accounts/authorizationcode/generate.html", context)

    @admin.action(description="Revoke selected codes (no further redemptions)", permissions=["change"])
    def revoke_codes(self, request, queryset):
        targets = list(queryset.filter(revoked_at__isnull=True))
        pending = AuthorizationCode.objects.filter(pk__in=[c.pk for c in targets], revoked_at__isnull=True)
        count = pending.update(revoked_at=timezone.now())
        log(request, targets, CHANGE, "Revoked")
        self.message_user(request, f"Revoked {count} code(s); existing entitlements are unchanged.", messages.SUCCESS)

    @admin.action(description="Revoke selected codes and the entitlements they granted", permissions=["change"])
    def revoke_codes_and_entitlements(self, request, queryset):
        revoked_codes = revoked_entitlements = 0
        for code in queryset:
            revoked_codes += code.revoked_at is None
            count = codes.revoke_code(code, with_entitlements=True)
            revoked_entitlements += count
            log(request, [code], CHANGE, f"Revoked with its entitlements ({count} revoked)")
        self.message_user(
            request,
            f"Revoked {revoked_codes} code(s) and {revoked_entitlements} entitlement(s); effective on the next request.",
            messages.SUCCESS,
        )


class EntitlementStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [
            ("active", "Active"), ("exhausted", "Active, quota used up"), ("revoked", "Revoked"),
            ("ended", "Ended"), ("future", "Not started"),
        ]

    def queryset(self, request, queryset):
        now = timezone.now()
        match self.value():
            case "active":
                return queryset.active(now)
            case "exhausted":
                return queryset.active(now).filter(token_quota__isnull=False, tokens_used__gte=F("token_quota"))
            case "revoked":
                return queryset.filter(revoked_at__isnull=False)
            case "ended":
                return queryset.filter(ends_at__lte=now)
            case "future":
                return queryset.filter(starts_at__gt=now)
        return queryset


class EntitlementForm(forms.ModelForm):
    """An operator's grant or edit: the same rules a redeemed code would satisfy."""

    class Meta:
        model = Entitlement
        fields = ["organization", "token_quota", "model_names", "starts_at", "ends_at"]
        help_texts = {"model_names": 'A JSON list of public model names, e.g. ["smollm2"]; [] for every model.'}

    def clean_model_names(self):
        value = self.cleaned_data.get("model_names")
        if value in (None, ""):
            return []
        if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
            raise forms.ValidationError('Enter a JSON list of model names, e.g. ["smollm2"], or [] for every model.')
        try:
            return codes.clean_model_names(value)
        except forms.ValidationError as exc:
            raise forms.ValidationError(exc.messages[0]) from exc

    def clean_token_quota(self):
        quota = self.cleaned_data.get("token_quota")
        if quota is None:
            return None
        if quota < 1:
            raise forms.ValidationError("The quota must be a positive number of tokens (empty: unlimited).")
        if self.instance.pk:
            # The counters as they are now (the gateway moves them while the form is open).
            used, reserved = Entitlement.objects.filter(pk=self.instance.pk).values_list(
                "tokens_used", "tokens_reserved").get()
            if quota < used + reserved:
                raise forms.ValidationError(
                    f"{used:,} tokens are used and {reserved:,} held by requests in flight; the quota cannot be "
                    f"lower than {used + reserved:,}.")
        return quota

    def clean(self):
        data = super().clean()
        starts, ends = data.get("starts_at"), data.get("ends_at")
        if starts and ends and ends <= starts:
            self.add_error("ends_at", "The end must be after the start.")
        return data


@admin.register(Entitlement)
class EntitlementAdmin(admin.ModelAdmin):
    form = EntitlementForm
    list_display = (
        "id", "organization", "status", "usage", "tokens_reserved", "models", "starts_at", "ends_at", "code",
        "revoked_at", "created_at",
    )
    list_filter = (EntitlementStatusFilter, "starts_at", "ends_at", "created_at")
    search_fields = ("organization__slug", "organization__name", "code__prefix", "code__note")
    search_help_text = "Organization slug or name, code prefix or the code's note."
    list_select_related = ("organization", "code")
    raw_id_fields = ("organization",)
    readonly_fields = ("code", "tokens_used", "tokens_reserved", "revoked_at", "created_at")
    fields = (
        "organization", "code", "token_quota", "tokens_used", "tokens_reserved", "model_names", "starts_at",
        "ends_at", "revoked_at", "created_at",
    )
    actions = ["revoke_entitlements"]
    date_hierarchy = "created_at"

    @admin.display(description="status")
    def status(self, obj: Entitlement) -> str:
        if obj.revoked_at is not None:
            return "revoked"
        now = timezone.now()
        if obj.starts_at > now:
            return "not started"
        if obj.ends_at is not None and obj.ends_at <= now:
            return "ended"
        if obj.token_quota is not None and obj.tokens_used >= obj.token_quota:
            return "quota used up"
        return "active"

    @admin.display(description="tokens used / quota", ordering="tokens_used")
    def usage(self, obj: Entitlement) -> str:
        return f"{obj.tokens_used:,} / {'unlimited' if obj.token_quota is None else f'{obj.token_quota:,}'}"

    @admin.display(description="models")
    def models(self, obj: Entitlement) -> str:
        return ", ".join(obj.model_names) or "all"

    def get_readonly_fields(self, request, obj=None):
        # The organization of an existing entitlement never changes (its usage belongs to it).
        return self.readonly_fields + (("organization",) if obj is not None else ())

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: usage records refer to entitlements

    def save_model(self, request, obj, form, change):
        """An edit writes only the fields the form edits: the usage counters the gateway moves meanwhile
        are never written back from the form's stale copy."""
        if change:
            obj.save(update_fields=[f for f in EntitlementForm.Meta.fields if f != "organization"])
        else:
            obj.save()

    @admin.action(description="Revoke selected entitlements (effective on the next request)", permissions=["change"])
    def revoke_entitlements(self, request, queryset):
        targets = list(queryset.filter(revoked_at__isnull=True))
        pending = Entitlement.objects.filter(pk__in=[e.pk for e in targets], revoked_at__isnull=True)
        count = pending.update(revoked_at=timezone.now())
        log(request, targets, CHANGE, "Revoked")
        self.message_user(request, f"Revoked {count} entitlement(s).", messages.SUCCESS)
