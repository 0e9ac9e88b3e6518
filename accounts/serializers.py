"""API serializers; field rules are the console forms' validators (accounts.forms)."""

from __future__ import annotations

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import serializers

from .forms import validate_future, validate_model_names
from .models import APIKey, KeyKind


def _django_rule(rule):
    def run(value):
        try:
            return rule(value)
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from exc

    return run


class RotatedFromSerializer(serializers.ModelSerializer):
    key = serializers.CharField(source="redacted", read_only=True)

    class Meta:
        model = APIKey
        fields = ["id", "key", "expires_at", "revoked_at"]
        read_only_fields = fields


class APIKeySerializer(serializers.ModelSerializer):
    key = serializers.CharField(source="redacted", read_only=True)
    kind = serializers.ChoiceField(choices=KeyKind.choices, default=KeyKind.MEMBER)
    rotated_from = RotatedFromSerializer(read_only=True)
    created_by = serializers.EmailField(source="created_by.email", read_only=True, default=None)
    status = serializers.CharField(read_only=True)
    allowed_models = serializers.ListField(
        child=serializers.CharField(max_length=128, allow_blank=False), required=False, max_length=50
    )
    requests_per_minute = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)
    tokens_per_minute = serializers.IntegerField(required=False, allow_null=True, min_value=1, max_value=2**31 - 1)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)

    class Meta:
        model = APIKey
        fields = [
            "id", "name", "key", "created_by", "created_at", "last_used_at", "expires_at",
            "allowed_models", "requests_per_minute", "tokens_per_minute", "revoked_at", "status", "kind",
            "rotated_from",
        ]
        read_only_fields = ["id", "created_at", "last_used_at", "revoked_at"]
        extra_kwargs = {"name": {"trim_whitespace": True}}

    def validate_allowed_models(self, value):
        return _django_rule(validate_model_names)(value)

    def validate_expires_at(self, value):
        return _django_rule(validate_future)(value)


class CreatedAPIKeySerializer(APIKeySerializer):
    """The create response: the only time the full key is ever returned."""

    secret = serializers.SerializerMethodField()

    class Meta(APIKeySerializer.Meta):
        fields = [*APIKeySerializer.Meta.fields, "secret"]

    def get_secret(self, obj) -> str:
        return self.context["raw_key"]


class RollSerializer(serializers.Serializer):
    grace_seconds = serializers.IntegerField(help_text="How long the old key keeps working; 0: it stops now.")
