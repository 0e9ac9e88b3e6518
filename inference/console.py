"""The console's inference pages: usage (GET /api/usage, JSON, session auth, and the usage page),
the models page and the playground."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views.decorators.csrf import ensure_csrf_cookie
from django.views.decorators.http import require_POST
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api_errors import APIError, ErrorSerializer
from accounts.models import APIKey
from accounts.tenancy import get_for_org_or_404, org_member_required, require_manager

from . import budgets, overview, quotas, requestlog, snippets
from .charts import usage_charts
from .forms import BudgetLimitForm
from .models import Budget, ModelKind
from .usage import Period, ReportError, report
from .views import model_object


class UsageAPI(APIView):
    """`GET /api/usage?start=&end=&group_by=model|key|day` for the current organization."""

    @extend_schema(parameters=[
        OpenApiParameter("start", str, description="ISO date or datetime (UTC when naive); default: 30 days before end."),
        OpenApiParameter("end", str, description="ISO date (that day included) or datetime; default: now."),
        OpenApiParameter("group_by", str, enum=["model", "key", "day"], description="Default: model."),
    ], responses={200: OpenApiTypes.OBJECT, 400: ErrorSerializer, 403: ErrorSerializer})
    def get(self, request):
        organization = getattr(request, "organization", None)
        if organization is None:
            raise APIError("You are not a member of any organization.", "no_organization", 403)
        try:
            period = Period.parse(request.query_params.get("start"), request.query_params.get("end"))
            return Response(report(organization, period, request.query_params.get("group_by", "model")))
        except ReportError as exc:
            raise APIError(str(exc), "invalid", 400, exc.param) from exc


@org_member_required
def usage_page(request):
    organization = request.organization
    error = None
    try:
        period = Period.parse(request.GET.get("start") or None, request.GET.get("end") or None)
    except ReportError as exc:
        error = str(exc)
        period = Period.parse(None, None)
    by_day = report(organization, period, "day")
    by_model = report(organization, period, "model")
    by_key = report(organization, period, "key")
    return render(request, "inference/usage.html", {
        "period": period,
        "error": error,
        "totals": by_day["totals"],
        "by_model": by_model["data"],
        "by_key": by_key["data"],
        "charts": usage_charts(organization, period),
        "budgets": Budget.objects.for_org(organization).select_related("api_key").order_by("api_key_id", "pk"),
        "csv_groups": [("day", "per day"), ("model", "per model"), ("key", "per key")],
        "start_value": request.GET.get("start") or period.start.date().isoformat(),
        "end_value": request.GET.get("end") or period.end.date().isoformat(),
    })


CAPABILITY_NAMES = {"tools": "Tools", "json_schema": "Structured outputs (JSON schema)", "json_object": "JSON mode",
                    "embeddings": "Embeddings"}


def organization_models(request, kind: str | None = None) -> list[dict]:
    """The catalog as the current organization sees it: the model objects of GET /v1/models for every
    model it may call (visible to it and covered by an active entitlement), with the model's `kind`;
    only those of `kind` when given."""
    caller = quotas.organization_caller(request.organization, request.user.pk)
    return [{**model_object(entry), "kind": entry.model.kind} for entry in caller.visible_models()
            if kind is None or entry.model.kind == kind]


@org_member_required
def models_page(request):
    models = organization_models(request)
    for model in models:
        model["capability_names"] = [CAPABILITY_NAMES.get(n, n) for n, on in model["capabilities"].items() if on]
    return render(request, "inference/models.html", {"models": models})


def api_base_url(request) -> str:
    """The OpenAI base URL callers use: API_BASE_URL, else this console's own origin plus /v1."""
    return settings.API_BASE_URL or request.build_absolute_uri("/v1")


@org_member_required
@ensure_csrf_cookie
def playground_page(request):
    """The playground: the page's JavaScript (static/js/playground.js) streams from
    /playground/v1/chat/completions with the session and its CSRF token, never a key."""
    models = organization_models(request, ModelKind.CHAT)
    ids = [m["id"] for m in models]
    wanted = request.GET.get("model")
    return render(request, "inference/playground.html", {
        "models": models,
        "selected": wanted if wanted in ids else (ids[0] if ids else None),
        "base_url": api_base_url(request),
    })


def quickstart_snippets(request, allowed_models: list[str] | None = None) -> dict:
    """Base URL, model and snippets for the current organization: its first model (by name) that it may
    call and, for a key with an allowlist, that the key may call too; None when there is none yet."""
    names = [m["id"] for m in organization_models(request, ModelKind.CHAT)]
    if allowed_models:
        names = [n for n in names if n in allowed_models]
    model = names[0] if names else None
    base_url = api_base_url(request)
    return {"base_url": base_url, "model": model, "snippets": snippets.quickstart(base_url, model)}


@org_member_required
def quickstart_page(request):
    """Get started: redeem a code, create a key, paste a snippet."""
    context = quickstart_snippets(request)
    context["has_key"] = APIKey.objects.for_org(request.organization).filter(revoked_at__isnull=True).exists()
    return render(request, "inference/quickstart.html", context)


@org_member_required
def request_log_page(request):
    """Recent requests, filterable and paginated; never prompt text (not stored)."""
    filters = requestlog.RequestLogFilter(request.organization, request.GET)  # bound: no filter means the default period
    page = Paginator(requestlog.request_log(request.organization, filters), requestlog.PAGE_SIZE).get_page(
        request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render(request, "inference/request_log.html", {"filters": filters, "page": page, "query": query.urlencode()},
                  status=400 if filters.errors else 200)


@org_member_required
def usage_csv(request):
    """GET /usage/export.csv?start=&end=&group_by=: the rows of GET /api/usage with the same parameters."""
    try:
        period = Period.parse(request.GET.get("start") or None, request.GET.get("end") or None)
        data = report(request.organization, period, request.GET.get("group_by", "day"))
    except ReportError as exc:
        return HttpResponse(f"{exc.param}: {exc}\n", status=400, content_type="text/plain; charset=utf-8")
    name = f"usage-{request.organization.slug}-{period.start.date()}-{period.end.date()}-by-{data['group_by']}.csv"
    response = HttpResponse(requestlog.report_csv(data), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{name}"'
    return response


@login_required
def operator_overview(request):
    """Staff only (others: 404, the page is not advertised): the whole platform at a glance."""
    if not request.user.is_staff:
        raise Http404("No such page.")
    return render(request, "inference/operator.html", {
        "days": overview.platform_days(), "replicas": overview.replicas(), "refusals": overview.refusals(),
    })


BATCH_PAGE_SIZE = 25


@org_member_required
def batches_page(request):
    """The organization's batches (status, request counts, links to their files) and its files."""
    from .batch_models import Batch, StoredFile

    batches = (Batch.objects.for_org(request.organization).select_related("input_file", "output_file", "error_file"))
    files = StoredFile.objects.for_org(request.organization)
    return render(request, "inference/batches.html", {
        "batches": Paginator(batches, BATCH_PAGE_SIZE).get_page(request.GET.get("page")),
        "files": Paginator(files, BATCH_PAGE_SIZE).get_page(request.GET.get("files_page")),
        "now": timezone.now(),
    })


@org_member_required
def batch_file_download(request, file_id: str):
    """A file of the organization (input, output or errors), for the browser: 404 for anyone else's."""
    from . import files
    from .errors import GatewayError

    try:
        stored = files.get(request.organization, file_id)
        data = files.read(stored)
    except GatewayError:
        raise Http404("No such file.") from None
    response = HttpResponse(data, content_type="application/jsonl")
    response["Content-Disposition"] = f'attachment; filename="{stored.filename}"'
    return response


def _budgets_page(request, org_form=None, key_forms=None, status=200):
    organization = request.organization
    by_key = {b.api_key_id: b for b in Budget.objects.for_org(organization)}
    key_forms = key_forms or {}
    keys = [
        {"key": key, "budget": by_key.get(key.pk),
         "form": key_forms.get(key.pk) or BudgetLimitForm(prefix=f"key-{key.pk}", initial=_initial(by_key.get(key.pk)))}
        for key in APIKey.objects.for_org(organization).filter(revoked_at__isnull=True).order_by("name", "pk")
    ]
    return render(request, "inference/budgets.html", {
        "org_budget": by_key.get(None),
        "org_form": org_form or BudgetLimitForm(prefix="org", initial=_initial(by_key.get(None))),
        "keys": keys,
    }, status=status)


def _initial(budget: Budget | None) -> dict:
    return {"limit": f"{budget.limit:.2f}"} if budget is not None else {}


def _save_budget(request, prefix: str, api_key: APIKey | None, whose: str):
    """POST of one budget form: remove, or set the limit. Returns the bound form on an error, else None."""
    if request.POST.get("action") == "remove":
        if budgets.remove_budget(request.membership, api_key):
            messages.success(request, f"Removed the budget of {whose}: it has no spending limit now.")
        return None
    form = BudgetLimitForm(request.POST, prefix=prefix)
    if form.is_valid():
        try:
            budgets.set_budget(request.membership, form.cleaned_data["limit"], api_key)
        except budgets.BudgetError as exc:
            form.add_error("limit", str(exc))
        else:
            messages.success(request, f"The budget of {whose} is now ${form.cleaned_data['limit']:.2f}.")
            return None
    return form


@org_member_required
def budgets_page(request):
    """`/budgets/`: owners and admins set the organization's budget (POST here) and each key's."""
    require_manager(request.membership)
    if request.method == "POST":
        form = _save_budget(request, "org", None, "the organization")
        if form is not None:
            return _budgets_page(request, org_form=form, status=400)
        return redirect("budgets")
    return _budgets_page(request)


@org_member_required
@require_POST
def key_budget(request, key_id: int):
    """`POST /budgets/keys/<key_id>/`: set or remove one key's budget (another organization's key is a 404)."""
    require_manager(request.membership)
    key = get_for_org_or_404(APIKey, request.organization, pk=key_id)
    form = _save_budget(request, f"key-{key.pk}", key, f"the key “{key.name}”")
    if form is not None:
        return _budgets_page(request, key_forms={key.pk: form}, status=400)
    return redirect("budgets")
