"""The one error shape of the session API under /api/ (DRF's EXCEPTION_HANDLER, maas/settings.py):
`{"error": {"message", "type", "param", "code"}}`, as /v1 answers; a validation error also lists every
field's messages under `error.fields`. Views raise `APIError` (or any DRF exception); none builds an
error body itself."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404
from rest_framework import serializers
from rest_framework.exceptions import APIException, NotFound, PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 409: "conflict_error",
               429: "rate_limit_error"}


class APIError(APIException):
    """A refusal with its HTTP status, machine-readable code, the parameter to blame and extra headers."""

    def __init__(self, message: str, code: str, status: int = 400, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message, code)
        self.status_code, self.param, self.headers = status, param, headers or {}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def exception_handler(exc, context) -> Response | None:
    if isinstance(exc, Http404):  # what DRF's own handler does with them, keeping a code
        exc = NotFound(str(exc) or None)
    elif isinstance(exc, DjangoPermissionDenied):
        exc = PermissionDenied(str(exc) or None)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # not an API exception: Django's 500 handling
    error = {"message": "", "type": error_type(response.status_code), "param": getattr(exc, "param", None),
             "code": None}
    if isinstance(exc, ValidationError):
        fields = response.data if isinstance(response.data, dict) else {"non_field_errors": response.data}
        param, messages = next(iter(fields.items()))
        first = messages[0] if isinstance(messages, list) and messages else messages
        while isinstance(first, dict | list) and first:  # nested (list items, objects)
            first = next(iter(first.values())) if isinstance(first, dict) else first[0]
        error.update(message=f"{param}: {first}" if param != "non_field_errors" else str(first), code="invalid",
                     param=None if param == "non_field_errors" else param, fields=fields)
    else:
        detail = response.data.get("detail", str(exc)) if isinstance(response.data, dict) else str(exc)
        codes = exc.get_codes() if isinstance(exc, APIException) else None
        error.update(message=str(detail), code=codes if isinstance(codes, str) else getattr(exc, "default_code", None))
    response.data = {"error": error}
    for name, value in getattr(exc, "headers", {}).items():
        response[name] = value
    return response


class ErrorDetailSerializer(serializers.Serializer):
    message = serializers.CharField()
    type = serializers.CharField(help_text="invalid_request_error, authentication_error, permission_error, "
                                           "not_found_error, conflict_error, rate_limit_error or server_error")
    param = serializers.CharField(allow_null=True, help_text="The field or parameter to blame, if any.")
    code = serializers.CharField(allow_null=True, help_text="Machine-readable reason, e.g. invalid, not_found.")
    fields = serializers.DictField(required=False, help_text="Validation errors: every field's messages.")


class ErrorSerializer(serializers.Serializer):
    """The body of every error answer under /api/."""

    error = ErrorDetailSerializer()
