"""Redeeming authorization codes: the console page and `POST /api/redeem`; the organization's entitlements.

Any member of the current organization may redeem a code for it: redeeming only adds access.
Failed attempts are limited per user and per IP (see `accounts.codes.FailureLimiter`).
"""

from __future__ import annotations

from django.contrib import messages
from django.shortcuts import redirect, render
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import codes, tenancy
from ..api_errors import APIError, ErrorSerializer
from ..audit import client_ip
from ..forms_codes import RedeemCodeForm
from ..models import Entitlement


class EntitlementSerializer(serializers.ModelSerializer):
    organization = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    code_prefix = serializers.CharField(source="code.prefix", read_only=True, default=None)
    tokens_remaining = serializers.IntegerField(read_only=True, allow_null=True)
    active = serializers.SerializerMethodField()

    class Meta:
        model = Entitlement
        fields = [
            "id", "organization", "code_prefix", "token_quota", "tokens_used", "tokens_reserved",
            "tokens_remaining", "model_names", "starts_at", "ends_at", "revoked_at", "active", "created_at",
        ]
        read_only_fields = fields

    def get_active(self, entitlement: Entitlement) -> bool:
        return entitlement.is_active()


class StrictCharField(serializers.CharField):
    """A string and nothing else (DRF's CharField would turn 12345 into "12345")."""

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class RedeemSerializer(serializers.Serializer):
    code = StrictCharField(
        max_length=200,
        error_messages={
            "required": 'Send the authorization code as {{"code": "mac-…"}}.',
            "blank": "The authorization code is empty.",
            "invalid": "The authorization code must be a string.",
            "null": "The authorization code is null; send it as a string.",
            "max_length": "That is too long to be an authorization code.",
        },
    )


def org_entitlements(organization):
    return Entitlement.objects.for_org(organization).select_related("code", "organization")


@tenancy.org_member_required
def redeem_page(request):
    form = RedeemCodeForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            entitlement = codes.redeem(
                request.organization, form.cleaned_data["code"], request.user, ip=client_ip(request)
            )
        except codes.RedemptionError as exc:
            form.add_error("code", exc.message)
        else:
            messages.success(request, f"Code redeemed: {describe(entitlement)}.")
            return redirect("console:redeem")
    context = {"form": form, "entitlements": org_entitlements(request.organization)}
    return render(request, "console/redeem.html", context, status=400 if form.errors else 200)


def describe(entitlement: Entitlement) -> str:
    quota = "unlimited tokens" if entitlement.token_quota is None else f"{entitlement.token_quota:,} tokens"
    until = f"valid until {entitlement.ends_at:%Y-%m-%d %H:%M} UTC" if entitlement.ends_at else "no end date"
    models = ", ".join(entitlement.model_names) if entitlement.model_names else "every model"
    return f"{quota}, {until}, {models}"


class RedeemAPIView(APIView):
    """`POST /api/redeem {"code": "..."}` -> 201 with the new entitlement of the current organization."""

    @extend_schema(summary="Redeem an authorization code for the current organization", request=RedeemSerializer,
                   responses={201: EntitlementSerializer, 400: ErrorSerializer, 404: ErrorSerializer,
                              409: ErrorSerializer, 429: ErrorSerializer})
    def post(self, request):
        serializer = RedeemSerializer(data=request.data if isinstance(request.data, dict) else {})
        if not serializer.is_valid():
            raise APIError(str(serializer.errors["code"][0]), "invalid", status.HTTP_400_BAD_REQUEST, param="code")
        try:
            entitlement = codes.redeem(
                request.organization, serializer.validated_data["code"], request.user, ip=client_ip(request)
            )
        except codes.RedemptionRateLimited as exc:
            raise APIError(exc.message, exc.code, exc.http_status, "code", {"Retry-After": str(exc.retry_after)}) from exc
        except codes.RedemptionError as exc:
            raise APIError(exc.message, exc.code, exc.http_status, "code") from exc
        return Response(EntitlementSerializer(entitlement).data, status=status.HTTP_201_CREATED)


class EntitlementListAPIView(APIView):
    """`GET /api/entitlements`: the current organization's entitlements, newest first."""

    @extend_schema(operation_id="entitlements_list", responses={200: EntitlementSerializer(many=True)})
    def get(self, request):
        if request.organization is None:
            return Response([])
        return Response(EntitlementSerializer(org_entitlements(request.organization), many=True).data)


class EntitlementDetailAPIView(APIView):
    """`GET /api/entitlements/{id}`: one of the current organization's entitlements; others are 404."""

    @extend_schema(responses={200: EntitlementSerializer, 404: ErrorSerializer})
    def get(self, request, pk: int):
        entitlement = None
        if request.organization is not None:
            entitlement = org_entitlements(request.organization).filter(pk=pk).first()
        if entitlement is None:
            raise APIError("Your organization has no entitlement with this id.", "not_found", 404)
        return Response(EntitlementSerializer(entitlement).data)
