import contextvars
import json
import logging

import pytest
from opentelemetry.sdk.trace import TracerProvider

from maas.logging import JsonFormatter, RequestContextFilter, request_id_var


def _format(record: logging.LogRecord) -> dict:
    RequestContextFilter().filter(record)
    return json.loads(JsonFormatter().format(record))


def _record(message: str = "hello %s", args=("world",)) -> logging.LogRecord:
    return logging.LogRecord("maas.test", logging.WARNING, __file__, 1, message, args, None)


def test_json_log_line_carries_request_id_and_trace_id():
    token = request_id_var.set("req-123")
    tracer = TracerProvider().get_tracer("test")
    try:
        with tracer.start_as_current_span("op") as span:
            line = _format(_record())
            ids = span.get_span_context()
    finally:
        request_id_var.reset(token)
    assert line["message"] == "hello world"
    assert line["level"] == "WARNING"
    assert line["logger"] == "maas.test"
    assert line["request_id"] == "req-123"
    assert line["trace_id"] == format(ids.trace_id, "032x")
    assert line["span_id"] == format(ids.span_id, "016x")
    assert "time" in line


def test_json_log_line_outside_a_request_has_null_ids():
    line = contextvars.Context().run(_format, _record("plain", ()))
    assert line["request_id"] is None and line["trace_id"] is None


def test_settings_wire_json_logging():
    from django.conf import settings

    assert settings.LOGGING["handlers"]["console"]["formatter"] == "json"
    assert "maas.logging.RequestIdMiddleware" in settings.MIDDLEWARE


@pytest.mark.django_db
def test_request_id_is_echoed_or_generated(client):
    response = client.get("/no-such-page/", HTTP_X_REQUEST_ID="abc-DEF.1")
    assert response["X-Request-ID"] == "abc-DEF.1"
    generated = client.get("/no-such-page/", HTTP_X_REQUEST_ID="bad id\nwith newline")
    assert generated["X-Request-ID"] != "bad id\nwith newline"
    assert len(generated["X-Request-ID"]) == 32


@pytest.mark.django_db
def test_log_emitted_in_a_view_has_the_request_id(client, caplog):
    caplog.set_level(logging.WARNING, logger="django.request")
    caplog.handler.addFilter(RequestContextFilter())
    response = client.get("/no-such-page/", HTTP_X_REQUEST_ID="req-404")
    assert response.status_code == 404
    records = [r for r in caplog.records if r.name == "django.request"]
    assert records
    assert records[-1].request_id == "req-404"
