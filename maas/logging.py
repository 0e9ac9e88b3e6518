"""Structured logs: one JSON object per line carrying the request id and the trace id.

`RequestIdMiddleware` takes the caller's ``X-Request-ID`` (when well-formed) or makes one, keeps it in
a context variable for the request's duration and echoes it in the response. `RequestContextFilter`
copies that id and the current OpenTelemetry trace/span ids onto every log record, so the JSON
formatter (python-json-logger) or a plain text format can print them.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def get_request_id() -> str | None:
    """The id of the request being served in this context (None outside a request)."""
    return request_id_var.get()


def new_request_id(incoming: str | None = None) -> str:
    """The caller's id when it is safe to log and echo, a fresh one otherwise."""
    if incoming and _VALID_REQUEST_ID.match(incoming):
        return incoming
    return uuid.uuid4().hex


def bind_request_id(request, request_id: str) -> None:
    """Adopt an id chosen by the view (the gateway's `req_...` ids) for the rest of the request."""
    request.request_id = request_id
    request_id_var.set(request_id)


class RequestContextFilter(logging.Filter):
    """Adds request_id, trace_id and span_id (None when absent) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = format(span_context.trace_id, "032x")
            record.span_id = format(span_context.span_id, "016x")
        else:
            record.trace_id = record.span_id = None
        return True


class JsonFormatter(_JsonFormatter):
    """python-json-logger with our field names; request/trace ids come from RequestContextFilter."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault(
            "fmt", "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(trace_id)s %(span_id)s"
        )
        kwargs.setdefault("rename_fields", {"asctime": "time", "levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", False)
        super().__init__(*args, **kwargs)


class RequestIdMiddleware:
    """Binds the request id for the request's duration and returns it in ``X-Request-ID``."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        self._bind(request)
        response = self.get_response(request)
        response.headers.setdefault(REQUEST_ID_HEADER, request.request_id)
        return response

    async def _acall(self, request):
        self._bind(request)
        response = await self.get_response(request)
        response.headers.setdefault(REQUEST_ID_HEADER, request.request_id)
        return response

    @staticmethod
    def _bind(request) -> None:
        # Not reset on the way out: Django logs a 4xx/5xx response after the middleware chain returns,
        # and a streamed body is produced later still; both need the id. Each ASGI request runs in a
        # context of its own, and a WSGI thread rebinds on its next request.
        request.request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER))
        request_id_var.set(request.request_id)
