"""API keys: the console page (one-time reveal, roll, revoke) and the JSON API `GET/POST /api/keys`,
`GET/DELETE /api/keys/{id}`, `POST /api/keys/{id}/roll`."""

from __future__ import annotations

import secrets

from django.contrib import messages
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, MethodNotAllowed, NotFound, ValidationError
from rest_framework.exceptions import PermissionDenied as APIPermissionDenied
from rest_framework.response import Response
from rest_framework.views import APIView

from .. import keys as keys_service
from .. import tenancy
from ..api_errors import ErrorSerializer
from ..forms import APIKeyForm
from ..models import APIKey
from ..serializers import APIKeySerializer, CreatedAPIKeySerializer, RollSerializer

GRACE_CHOICES = [(0, "none: the old key stops now"), (3600, "1 hour"), (86400, "24 hours"), (7 * 86400, "7 days")]


def _org_keys(request):
    return APIKey.objects.for_org(request.organization).select_related("created_by", "rotated_from", "budget")


def _keys_page(request, form, created=None, raw_key=None, status_code=200, rolled=None):
    # The full key is rendered in this one response only; it is never stored or shown again.
    context = {
        "keys": _org_keys(request), "form": form, "created": created, "raw_key": raw_key, "rolled": rolled,
        "submission": secrets.token_urlsafe(16), "grace_choices": GRACE_CHOICES,
    }
    if raw_key:
        # Imported here: the gateway app builds on accounts, not the reverse.
        from inference.console import quickstart_snippets

        context["quickstart"] = quickstart_snippets(request, created.allowed_models)
    response = render(request, "console/keys.html", context, status=status_code)
    if raw_key:
        response["Cache-Control"] = "no-store"
    return response


def _first_submission(request) -> bool:
    """False when this create form was already submitted (a reload re-posting it): no second key."""
    nonce = request.POST.get("submission", "")
    return not nonce or cache.add(f"console:key-form:{request.user.pk}:{nonce[:64]}", 1, timeout=3600)


@tenancy.org_member_required
def keys(request):
    form = APIKeyForm(request.POST or None)
    created = raw_key = None
    status_code = 200
    if request.method == "POST":
        if not _first_submission(request):
            messages.info(request, "That key was already created; its full value was shown once and cannot be shown again.")
            return redirect("console:keys")
        if form.is_valid():
            try:
                created, raw_key = keys_service.create_key(request.membership, **form.cleaned_data)
            except keys_service.KeyRuleError as exc:
                form.add_error(exc.param, str(exc))
                status_code = 400
            else:
                form = APIKeyForm()
        else:
            status_code = 400
    return _keys_page(request, form, created, raw_key, status_code)


@tenancy.org_member_required
@require_POST
def key_roll(request, pk: int):
    key = tenancy.get_for_org_or_404(APIKey, request.organization, pk=pk)
    try:
        grace = int(request.POST.get("grace_seconds", ""))
    except ValueError:
        grace = -1
    try:
        created, raw_key = keys_service.roll_key(request.membership, key, grace)
    except keys_service.KeyRuleError as exc:
        messages.error(request, str(exc))
        return redirect("console:keys")
    return _keys_page(request, APIKeyForm(), created, raw_key, rolled=key)


@tenancy.org_member_required
@require_POST
def key_revoke(request, pk: int):
    key = tenancy.get_for_org_or_404(APIKey, request.organization, pk=pk)
    keys_service.check_can_manage_key(request.membership, key)
    key.revoke()
    messages.success(request, f"Revoked the key “{key.name}”. It stops working immediately.")
    return redirect("console:keys")


class OrgAPIView(APIView):
    """Session-authenticated, CSRF-protected, scoped to the session's current organization."""

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)
        if request.organization is None:
            raise NotFound("You belong to no organization; create one in the console first.")


ERRORS = {400: ErrorSerializer, 403: ErrorSerializer, 404: ErrorSerializer}


class APIKeyListView(OrgAPIView):
    @extend_schema(operation_id="keys_list", summary="The organization's API keys, newest first",
                   responses={200: APIKeySerializer(many=True), 404: ErrorSerializer})
    def get(self, request):
        return Response(APIKeySerializer(_org_keys(request), many=True).data)

    @extend_schema(summary="Create a key; the response has its secret, the only time it is shown",
                   request=APIKeySerializer, responses={201: CreatedAPIKeySerializer, **ERRORS})
    def post(self, request):
        serializer = APIKeySerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            key, raw = keys_service.create_key(request.membership, **serializer.validated_data)
        except keys_service.KeyRuleError as exc:
            raise api_error(exc) from exc
        return Response(CreatedAPIKeySerializer(key, context={"raw_key": raw}).data, status=status.HTTP_201_CREATED)


class APIKeyDetailView(OrgAPIView):
    def _key(self, request, pk: int) -> APIKey:
        return tenancy.get_for_org_or_404(_org_keys(request), request.organization, pk=pk)

    @extend_schema(summary="One key of the organization (another organization's is a 404)",
                   responses={200: APIKeySerializer, 404: ErrorSerializer})
    def get(self, request, pk: int):
        return Response(APIKeySerializer(self._key(request, pk)).data)

    @extend_schema(summary="Revoke a key (it stops working now)", responses={200: APIKeySerializer, **ERRORS})
    def delete(self, request, pk: int):
        key = self._key(request, pk)
        try:
            keys_service.check_can_manage_key(request.membership, key)
        except PermissionDenied as exc:
            raise APIPermissionDenied(str(exc)) from exc
        key.revoke()
        return Response(APIKeySerializer(key).data)


class APIKeyRollView(APIKeyDetailView):
    """`POST /api/keys/{id}/roll {"grace_seconds": N}`: 201 with the successor (its secret, once)."""

    @extend_schema(exclude=True)
    def get(self, request, pk: int):
        raise MethodNotAllowed("GET")

    @extend_schema(exclude=True)
    def delete(self, request, pk: int):
        raise MethodNotAllowed("DELETE")

    @extend_schema(summary="Roll a key: a successor now, the old key ends after the grace period",
                   request=RollSerializer, responses={201: CreatedAPIKeySerializer, 409: ErrorSerializer, **ERRORS})
    def post(self, request, pk: int):
        key = self._key(request, pk)
        serializer = RollSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        try:
            new, raw = keys_service.roll_key(request.membership, key, serializer.validated_data["grace_seconds"])
        except PermissionDenied as exc:
            raise APIPermissionDenied(str(exc)) from exc
        except keys_service.KeyRuleError as exc:
            raise api_error(exc) from exc
        return Response(CreatedAPIKeySerializer(new, context={"raw_key": raw}).data, status=status.HTTP_201_CREATED)


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"


def api_error(exc: keys_service.KeyRuleError) -> APIException:
    if exc.status == 409:
        return Conflict(str(exc))
    return ValidationError({exc.param: [str(exc)]} if exc.param else [str(exc)])
