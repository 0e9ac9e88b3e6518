"""OpenAI-format errors: every failure under /v1/ is `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import json

from django.http import HttpResponse


class GatewayError(Exception):
    """Raised anywhere on the request path; the view turns it into an OpenAI error response."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def response(self) -> HttpResponse:
        return error_response(self.status, self.message, self.type, self.code, self.param, self.headers)


def error_body(message: str, type: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> HttpResponse:
    response = HttpResponse(
        json.dumps(error_body(message, type, code, param)), status=status, content_type="application/json"
    )
    for name, value in (headers or {}).items():
        response[name] = value
    return response


# The refusals the gateway gives, named once so views and tests agree on the wire format.
NO_RETRY = {"x-should-retry": "false"}


def invalid_api_key(message: str = "Incorrect API key provided.") -> GatewayError:
    return GatewayError(401, message, "invalid_request_error", "invalid_api_key")


def no_entitlement() -> GatewayError:
    return GatewayError(
        403,
        "Your organization has no active entitlement. Redeem an authorization code in the console.",
        "invalid_request_error",
        "authorization_required",
        headers=NO_RETRY,
    )


def model_not_found(name: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model `{name}` does not exist or you do not have access to it.",
        "invalid_request_error",
        "model_not_found",
    )


def insufficient_quota() -> GatewayError:
    return GatewayError(
        429,
        "You exceeded your current quota: this request's token reservation does not fit your entitlement.",
        "insufficient_quota",
        "insufficient_quota",
        headers=NO_RETRY,
    )


def insufficient_budget(budget, cost) -> GatewayError:
    """The request's worst-case cost does not fit what is left of a budget even with nothing in flight."""
    whose = "API key's" if budget.api_key_id is not None else "organization's"
    left = max(budget.limit - budget.spent, 0)
    return GatewayError(
        429,
        f"You exceeded your budget: this request may cost up to ${cost:.6f}, and the {whose} budget has "
        f"${left:.6f} of ${budget.limit:.2f} left. Lower max_tokens, or ask an owner to raise the budget.",
        "insufficient_quota",
        "insufficient_quota",
        headers=NO_RETRY,
    )


def quota_in_flight(retry_after_ms: int) -> GatewayError:
    """The quota is not used up: its room is held by requests in flight. Retryable, unlike insufficient_quota."""
    return GatewayError(
        429,
        "Your quota's remaining tokens (or budget) are held by requests still in flight; retry when they finish.",
        "tokens",
        "quota_in_flight",
        headers={"retry-after": str(max(1, -(-retry_after_ms // 1000))), "retry-after-ms": str(retry_after_ms),
                 "x-should-retry": "true"},
    )


def service_unavailable(message: str) -> GatewayError:
    return GatewayError(503, message, "server_error", "service_unavailable")


def invalid_param(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, "invalid_request_error", "invalid_value", param)


def _under_api(request) -> bool:
    return request.path == "/v1" or request.path.startswith("/v1/")


def bad_request(request, exception=None):
    """handler400: OpenAI JSON under /v1/ (e.g. a Host header not in ALLOWED_HOSTS), Django's page elsewhere."""
    if _under_api(request):
        return error_response(400, "Bad request.", code="bad_request")
    from django.views.defaults import bad_request as default

    return default(request, exception)


def permission_denied(request, exception=None):
    if _under_api(request):
        return error_response(403, "Forbidden.", code="forbidden")
    from django.views.defaults import permission_denied as default

    return default(request, exception)


def page_not_found(request, exception=None):
    if _under_api(request):
        return error_response(404, f"Invalid URL ({request.method} {request.path})", code="unknown_url")
    from django.views.defaults import page_not_found as default

    return default(request, exception)


def server_error(request):
    """handler500: an exception outside the views' own handling (e.g. in a middleware)."""
    if _under_api(request):
        return error_response(500, "The server had an error while processing your request.", "server_error")
    from django.views.defaults import server_error as default

    return default(request)
