"""OpenTelemetry for the control plane and gateway (web processes, Celery worker and beat).

Configured only from the standard ``OTEL_*`` environment variables: an exporter is chosen by
``OTEL_TRACES_EXPORTER`` (``otlp`` — OTLP/HTTP protobuf, the default once an OTLP endpoint is set —
or ``console``), the endpoint/headers by ``OTEL_EXPORTER_OTLP_*``, the service by ``OTEL_SERVICE_NAME``
/ ``OTEL_RESOURCE_ATTRIBUTES``, the sampler by ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``.
With none of them set (or ``OTEL_SDK_DISABLED=true``) nothing is imported or patched: the API's
no-op tracer makes every ``span()`` below free.

This module does not import Django at module level, so ``maas.asgi`` can call it before the
application (and its middleware list) is built. The engine has its own twin (engine/telemetry.py):
the engine never imports the control plane, and the control plane must not pull in torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import baggage, context, trace

logger = logging.getLogger(__name__)

TRACER_NAME = "maas"
# Baggage keys the gateway sends to the engine, so engine spans carry the tenant without the engine
# knowing anything about tenants.
BAGGAGE_ORGANIZATION = "maas.organization.id"
BAGGAGE_API_KEY = "maas.api_key.id"

_configured: bool | None = None
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)
# A proxy that binds to the SDK's tracer once the provider is installed (get_tracer per span is costly).
_TRACER = trace.get_tracer(TRACER_NAME)


def tracing_requested(environ: os._Environ | dict = os.environ) -> bool:
    """True when the environment asks for traces to be exported."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters and exporters != {"none"}:
        return True
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _span_exporters() -> list:
    names = [e.strip().lower() for e in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()]
    exporters = []
    for name in names:
        if name == "otlp":
            protocol = os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            )
            if protocol != "http/protobuf":
                raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported; use http/protobuf.")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp, console or none.")
    return exporters


def configure_tracer_provider(default_service_name: str) -> bool:
    """Install the SDK tracer provider once per process; False (and nothing done) when tracing is off."""
    global _configured
    if _configured is not None:
        return _configured
    _configured = tracing_requested()
    if not _configured:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: default_service_name}
    # TracerProvider reads OTEL_TRACES_SAMPLER(_ARG) itself; Resource.create reads OTEL_SERVICE_NAME.
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _span_exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return True


def configure_telemetry(service_name: str = "maas-web") -> bool:
    """Tracing for a Django process: Django, httpx, psycopg and Celery instrumented.

    Call before the WSGI/ASGI application is created: the Django instrumentation adds its middleware.
    """
    if not configure_tracer_provider(service_name):
        return False
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    for instrumentor in (DjangoInstrumentor(), HTTPXClientInstrumentor(), PsycopgInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
    # Producers (web) get publish spans and inject the context into task headers; workers continue it.
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    if not CeleryInstrumentor().is_instrumented_by_opentelemetry:
        CeleryInstrumentor().instrument()
    logger.info("OpenTelemetry tracing enabled for %s", os.environ.get("OTEL_SERVICE_NAME", service_name))
    return True


def flush(timeout_millis: int = 5000) -> None:
    """Export what is buffered (before a short-lived process exits)."""
    provider = trace.get_tracer_provider()
    if hasattr(provider, "force_flush"):
        provider.force_flush(timeout_millis)


def tracer() -> trace.Tracer:
    return _TRACER


def span(name: str, attributes: Mapping[str, Any] | None = None) -> contextlib.AbstractContextManager[trace.Span]:
    """A child span of the current one; attributes with value None are left out. Tracing off: a shared
    no-op context manager (no span object, no context switch)."""
    if not _configured:
        return _NO_SPAN
    return tracer().start_as_current_span(name, attributes=_clean(attributes or {}))


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (the request's server span in a view)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_clean(attributes))


def tenant_baggage(organization_id: Any, api_key_id: Any) -> contextlib.AbstractContextManager[None]:
    """Within the block, outgoing calls (httpx) carry the tenant ids as W3C baggage to the engine."""
    if not _configured:
        return contextlib.nullcontext()
    return _baggage(organization_id, api_key_id)


@contextlib.contextmanager
def _baggage(organization_id: Any, api_key_id: Any) -> Iterator[None]:
    ctx = baggage.set_baggage(BAGGAGE_ORGANIZATION, str(organization_id))
    ctx = baggage.set_baggage(BAGGAGE_API_KEY, str(api_key_id), context=ctx)
    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if value is not None}
