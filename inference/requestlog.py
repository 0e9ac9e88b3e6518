"""The organization's request log (one row per usage record, never the prompt or the answer: the
gateway stores neither) and the usage report as CSV."""

from __future__ import annotations

import csv
import io

from django import forms
from django.db.models import Q, QuerySet

from accounts.models import APIKey, Organization

from .models import UsageRecord, UsageSource, UsageStatus
from .usage import Period, ReportError

PAGE_SIZE = 50
PLAYGROUND = "playground"


class RequestLogFilter(forms.Form):
    """GET filters of the request log; choices are the organization's own keys and models."""

    key = forms.ChoiceField(required=False, label="Key")
    model = forms.ChoiceField(required=False, label="Model")
    outcome = forms.ChoiceField(required=False, label="Status", choices=[
        ("", "All"), ("ok", "Completed"), ("failed", "Failed or cut"), *UsageStatus.choices[1:]])
    start = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    end = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}),
                          help_text="Included.")
    request_id = forms.CharField(required=False, max_length=64, label="Request id")

    def __init__(self, organization: Organization, *args, **kwargs):
        super().__init__(*args, **kwargs)
        keys = APIKey.objects.for_org(organization).order_by("name").values_list("public_id", "name")
        self.fields["key"].choices = [("", "All"), (PLAYGROUND, "Playground"),
                                      *[(public_id, f"{name} (sk-{public_id}-…)") for public_id, name in keys]]
        models = (UsageRecord.objects.for_org(organization).order_by("model_name")
                  .values_list("model_name", flat=True).distinct())
        self.fields["model"].choices = [("", "All"), *[(m, m) for m in models]]

    def clean(self):
        data = super().clean()
        try:
            self.period = Period.parse(data["start"].isoformat() if data.get("start") else None,
                                       data["end"].isoformat() if data.get("end") else None)
        except ReportError as exc:
            self.add_error(exc.param if exc.param in self.fields else None, str(exc))
        return data


def request_log(organization: Organization, filters: RequestLogFilter) -> QuerySet[UsageRecord]:
    """The organization's usage records, newest first, narrowed by the filters (none when they are invalid:
    the page shows the form's errors)."""
    rows = UsageRecord.objects.for_org(organization).select_related("api_key").order_by("-created_at", "-pk")
    if not filters.is_valid():
        return rows.none()
    data = filters.cleaned_data
    rows = rows.filter(created_at__gte=filters.period.start, created_at__lt=filters.period.end)
    if data["key"] == PLAYGROUND:
        rows = rows.filter(source=UsageSource.PLAYGROUND)
    elif data["key"]:
        rows = rows.filter(api_key__public_id=data["key"])
    if data["model"]:
        rows = rows.filter(model_name=data["model"])
    if data["outcome"] == "failed":
        rows = rows.filter(~Q(status=UsageStatus.OK))
    elif data["outcome"]:
        rows = rows.filter(status=data["outcome"])
    if data["request_id"]:
        rows = rows.filter(request_id=data["request_id"].strip())
    return rows


CSV_COLUMNS = ("requests", "failed_requests", "prompt_tokens", "cached_tokens", "completion_tokens", "total_tokens",
               "cost")


def report_csv(report: dict) -> str:
    """One line per row of a usage report (GET /api/usage's `data`), the group first, then a total."""
    group_by = report["group_by"]
    head = {"day": ["day"], "model": ["model"], "key": ["api_key_id", "api_key_name", "source"]}[group_by]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*head, *CSV_COLUMNS])
    for row in report["data"]:
        if group_by == "key":
            group = [row["api_key"]["id"] or "", row["api_key"]["name"], row["api_key"]["source"]]
        else:
            group = [row[group_by]]
        writer.writerow([*group, *(row[c] for c in CSV_COLUMNS)])
    writer.writerow(["total", *([""] * (len(head) - 1)), *(report["totals"][c] for c in CSV_COLUMNS)])
    return out.getvalue()
