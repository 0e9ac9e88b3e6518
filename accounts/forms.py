"""Console forms. The validators here are shared with the API serializers: one rule per field."""

from __future__ import annotations

import re
from datetime import datetime

from django import forms
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.utils import timezone

from .models import APIKey, KeyKind, Role

MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
MAX_MODELS_PER_KEY = 50


def validate_model_names(names: list[str]) -> list[str]:
    """Deduplicated public model names; each must look like a model name."""
    cleaned: list[str] = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if not MODEL_NAME_RE.match(name):
            raise ValidationError(
                f"{name[:80]!r} is not a valid model name (letters, digits and . _ : / @ + -, at most 128 characters)."
            )
        if name not in cleaned:
            cleaned.append(name)
    if len(cleaned) > MAX_MODELS_PER_KEY:
        raise ValidationError(f"At most {MAX_MODELS_PER_KEY} models per key.")
    return cleaned


def validate_future(moment: datetime | None) -> datetime | None:
    if moment is not None and moment <= timezone.now():
        raise ValidationError("The expiry must be in the future.")
    return moment


def parse_model_list(text: str) -> list[str]:
    return validate_model_names(re.split(r"[,\s]+", text or ""))


class APIKeyForm(forms.ModelForm):
    allowed_models = forms.CharField(
        required=False,
        label="Allowed models",
        help_text="Comma-separated model names; leave empty to allow every model the organization may use.",
        widget=forms.TextInput(attrs={"placeholder": "e.g. smollm2-135m-instruct", "autocomplete": "off"}),
    )
    expires_at = forms.DateTimeField(
        required=False,
        label="Expires at (UTC)",
        help_text="Optional; the key stops working at this moment.",
        input_formats=["%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d"],
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
    )

    class Meta:
        model = APIKey
        fields = ["name", "kind", "expires_at", "allowed_models", "requests_per_minute", "tokens_per_minute"]
        labels = {"requests_per_minute": "Requests per minute", "tokens_per_minute": "Tokens per minute",
                  "kind": "Belongs to"}
        help_texts = {
            "kind": "A member key stops working when its creator leaves the organization; a service key "
                    "(owners and admins) stays until revoked.",
            "name": "What the key is for, e.g. “staging chatbot”.",
            "requests_per_minute": "Optional per-key limit.",
            "tokens_per_minute": "Optional per-key limit.",
        }
        widgets = {"name": forms.TextInput(attrs={"autocomplete": "off"})}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["kind"].required = False
        self.fields["kind"].initial = KeyKind.MEMBER
        for name in ("requests_per_minute", "tokens_per_minute"):
            self.fields[name].validators.append(MinValueValidator(1, "Must be at least 1; leave empty for no limit."))
            self.fields[name].widget.attrs["min"] = 1

    def clean_kind(self) -> str:
        return self.cleaned_data.get("kind") or KeyKind.MEMBER

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise ValidationError("Give the key a name.")
        return name

    def clean_expires_at(self):
        return validate_future(self.cleaned_data.get("expires_at"))

    def clean_allowed_models(self) -> list[str]:
        return parse_model_list(self.cleaned_data.get("allowed_models", ""))


class InvitationForm(forms.Form):
    email = forms.EmailField(label="Email address", widget=forms.EmailInput(attrs={"autocomplete": "off"}))
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class OrganizationForm(forms.Form):
    name = forms.CharField(max_length=200, label="Organization name")

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise ValidationError("Give the organization a name.")
        return name
