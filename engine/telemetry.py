"""OpenTelemetry for the engine server: one trace from the gateway through the engine.

Configured, like the control plane (maas/telemetry.py, which the engine must not import), only from the
standard ``OTEL_*`` variables; with none set nothing is imported and every call here returns at once.
The ASGI middleware continues the caller's W3C ``traceparent`` (the gateway's httpx call), and each
finished request is drawn as spans from the engine's own timestamps:

    engine.generate                  arrival → last token (model, token counts, finish reason, tenant)
      engine.queue_wait              arrival → first scheduled
      engine.time_to_first_token     arrival → first token
        engine.prefill               first scheduled → first token (prompt and cached token counts)
      engine.decode                  first token → last token (output tokens)

The tenant (organization id, API key public id) arrives as W3C baggage set by the gateway. Prompt and
completion text are recorded only with OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true.
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import time
from typing import Any

from opentelemetry import baggage, trace

log = logging.getLogger(__name__)

TRACER_NAME = "maas.engine"
BAGGAGE_ORGANIZATION = "maas.organization.id"
BAGGAGE_API_KEY = "maas.api_key.id"
CAPTURE_CONTENT_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
EXCLUDED_URLS = "health,metrics"

_enabled: bool | None = None
_TRACER = trace.get_tracer(TRACER_NAME)  # a proxy, bound to the SDK tracer once the provider is installed


def tracing_requested(environ=os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters and exporters != {"none"}:
        return True
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def capture_content() -> bool:
    return os.environ.get(CAPTURE_CONTENT_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def configure_tracing(default_service_name: str = "maas-engine") -> bool:
    """Install the SDK tracer provider once per process; False when the environment asks for no tracing."""
    global _enabled
    if _enabled is not None:
        return _enabled
    _enabled = tracing_requested()
    if not _enabled:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in [e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]:
        if name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            )
            if protocol != "http/protobuf":
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use http/protobuf.")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp, console or none.")
    trace.set_tracer_provider(provider)
    log.info("OpenTelemetry tracing enabled for %s", os.environ.get("OTEL_SERVICE_NAME", default_service_name))
    return True


def enabled() -> bool:
    return bool(_enabled)


class TraceContextFilter(logging.Filter):
    """Adds trace_id and span_id of the current span (None outside one) to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        record.trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else None
        record.span_id = format(span_context.span_id, "016x") if span_context.is_valid else None
        return True


def configure_logging(level: str) -> dict | None:
    """LOG_FORMAT=json: one JSON object per line with trace_id/span_id (uvicorn's loggers included);
    returns the logging config to hand to uvicorn, or None for uvicorn's own text format."""
    if os.environ.get("LOG_FORMAT", "text").strip().lower() != "json":
        logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return None
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"trace": {"()": TraceContextFilter}},
        "formatters": {
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(trace_id)s %(span_id)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            }
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "filters": ["trace"], "formatter": "json"}},
        "root": {"handlers": ["console"], "level": level.upper()},
        "loggers": {name: {"handlers": [], "propagate": True} for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
    logging.config.dictConfig(config)
    return config


def instrument_app(app) -> None:
    """Server spans continuing the caller's traceparent (health and metrics probes left out)."""
    if not enabled():
        return
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    app.add_middleware(OpenTelemetryMiddleware, excluded_urls=EXCLUDED_URLS)


def _epoch_ns(perf_time: float, now_perf: float, now_ns: int) -> int:
    """A time.perf_counter() reading as Unix nanoseconds (spans need wall-clock times)."""
    return now_ns - int((now_perf - perf_time) * 1e9)


def record_request(
    out,
    *,
    model: str,
    finish_reasons: list[str | None],
    request_id: str | None = None,
    prompt: Any = None,
    completion: list[str] | None = None,
    tracer_provider=None,
) -> None:
    """Spans of one finished request (an `engine.llm_engine.RequestOutput` with its timestamps),
    children of the current (server) span."""
    if not enabled() or out is None or out.finish_time is None:
        return
    tracer = _TRACER if tracer_provider is None else trace.get_tracer(TRACER_NAME, tracer_provider=tracer_provider)
    now_perf, now_ns = time.perf_counter(), time.time_ns()

    def at(perf_time: float) -> int:
        return _epoch_ns(perf_time, now_perf, now_ns)

    arrival, finish = at(out.arrival_time), at(out.finish_time)
    first_token = at(out.first_token_time) if out.first_token_time is not None else None
    scheduled = at(out.first_scheduled_time) if out.first_scheduled_time is not None else None
    attributes = {
        "gen_ai.system": "maas-engine",
        "gen_ai.request.model": model,
        "gen_ai.usage.input_tokens": out.num_prompt_tokens,
        "gen_ai.usage.output_tokens": out.num_output_tokens,
        "maas.engine.cached_tokens": out.num_cached_tokens,
        "gen_ai.response.finish_reasons": [r or "" for r in finish_reasons],
        "maas.status": "ok" if all(r not in (None, "abort") for r in finish_reasons) else "incomplete",
    }
    if request_id:
        attributes["maas.request_id"] = request_id
    for key, name in ((BAGGAGE_ORGANIZATION, "maas.organization.id"), (BAGGAGE_API_KEY, "maas.api_key.id")):
        value = baggage.get_baggage(key)
        if value is not None:
            attributes[name] = str(value)
    if capture_content():
        if prompt is not None:
            attributes["gen_ai.prompt"] = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
        if completion is not None:
            attributes["gen_ai.completion"] = json.dumps(completion, ensure_ascii=False)

    generate = tracer.start_span("engine.generate", start_time=arrival, attributes=attributes)
    context = trace.set_span_in_context(generate)
    if scheduled is not None:
        tracer.start_span("engine.queue_wait", context=context, start_time=arrival).end(end_time=scheduled)
    if first_token is not None:
        ttft = tracer.start_span(
            "engine.time_to_first_token", context=context, start_time=arrival,
            attributes={"maas.engine.ttft_ms": (first_token - arrival) / 1e6},
        )
        if scheduled is not None:
            tracer.start_span(
                "engine.prefill", context=trace.set_span_in_context(ttft), start_time=scheduled,
                attributes={
                    "gen_ai.usage.input_tokens": out.num_prompt_tokens,
                    "maas.engine.cached_tokens": out.num_cached_tokens,
                    "maas.engine.prefill_tokens": out.num_prompt_tokens - out.num_cached_tokens,
                },
            ).end(end_time=first_token)
        ttft.end(end_time=first_token)
        tracer.start_span(
            "engine.decode", context=context, start_time=first_token,
            attributes={"gen_ai.usage.output_tokens": out.num_output_tokens},
        ).end(end_time=finish)
    generate.end(end_time=finish)
