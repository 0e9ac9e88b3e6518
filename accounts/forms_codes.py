"""Forms for authorization codes: redeeming (console) and issuing (admin page and `issue_codes`)."""

from __future__ import annotations

import datetime as dt

from django import forms
from django.core.exceptions import ValidationError
from django.utils import timezone

from . import codes
from .models import User


class RedeemCodeForm(forms.Form):
    code = forms.CharField(
        label="Authorization code",
        max_length=200,
        strip=True,
        error_messages={"required": "Enter the authorization code you received."},
        widget=forms.TextInput(
            attrs={"autocomplete": "off", "spellcheck": "false", "placeholder": "mac-xxxxxxxx-…", "autofocus": True}
        ),
    )


class IssueCodesForm(forms.Form):
    """The options of a batch; the same validation for the admin page and the management command."""

    count = forms.IntegerField(label="Number of codes", min_value=1, max_value=codes.MAX_CODES_PER_BATCH, initial=10)
    token_quota = forms.IntegerField(
        label="Token quota", min_value=1, required=False, help_text="Tokens each redemption grants; empty: unlimited."
    )
    validity_days = forms.IntegerField(
        label="Validity (days)", min_value=1, required=False, help_text="Counted from redemption; empty: no end."
    )
    model_names = forms.CharField(
        label="Models", required=False, max_length=2000, help_text="Comma-separated public model names; empty: every model."
    )
    max_redemptions = forms.IntegerField(
        label="Redemptions per code", min_value=1, initial=1, help_text="How many organizations can redeem each code."
    )
    expires_on = forms.DateField(
        label="Redeemable until", required=False, help_text="YYYY-MM-DD, inclusive (UTC); empty: never expires.",
        widget=forms.DateInput(attrs={"type": "date"}),
    )
    note = forms.CharField(label="Note", required=False, max_length=200, help_text="For operators, e.g. who gets the batch.")

    def clean_model_names(self) -> list[str]:
        try:
            return codes.clean_model_names(self.cleaned_data.get("model_names"))
        except ValidationError as exc:
            raise ValidationError(exc.messages[0], code="invalid_model") from exc

    def clean_expires_on(self) -> dt.date | None:
        day = self.cleaned_data.get("expires_on")
        if day is not None and codes.end_of_day(day) <= timezone.now():
            raise ValidationError("The expiry date must be today or later.", code="past")
        return day

    def issue(self, created_by: User | None = None) -> list[codes.IssuedCode]:
        data = self.cleaned_data
        day = data.get("expires_on")
        return codes.issue_codes(
            data["count"],
            token_quota=data.get("token_quota"),
            validity_days=data.get("validity_days"),
            model_names=data.get("model_names"),
            max_redemptions=data["max_redemptions"],
            expires_at=codes.end_of_day(day) if day else None,
            note=data.get("note", ""),
            created_by=created_by,
        )
