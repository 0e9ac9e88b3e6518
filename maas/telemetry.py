"""OpenTelemetry for the control plane and gateway (web processes, Celery worker and beat).

Configured only from the standard ``OTEL_*`` environment variables: an exporter is chosen by
``OTEL_TRACES_EXPORTER`` (``otlp`` — OTLP/HTTP protobuf, the default once an OTLP endpoint is set —
or ``console``), the endpoint/headers by ``OTEL_EXPORTER_OTLP_*``, the service by ``OTEL_SERVICE_NAME``
/ ``OTEL_RESOURCE_ATTRIBUTES``, the sampler by ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``.
With none of them set (or ``OTEL_SDK_DISABLED=true``) nothing is imported or patched: the API's
no-op tracer makes every ``span()`` below free.

This module does not import Django at module level, so ``maas.asgi`` can call it before the
application (and its middleware list) is built. The SDK set-up itself lives in engine/telemetry.py (the
engine never imports the control plane; importing it pulls in neither Django nor torch).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import baggage, context, trace

# One SDK set-up for every process (the engine's module imports neither Django nor torch); the baggage
# keys carry the tenant from the gateway to the engine's spans.
from engine.telemetry import BAGGAGE_API_KEY, BAGGAGE_ORGANIZATION, configure_tracing
from engine.telemetry import enabled as tracing_enabled

logger = logging.getLogger(__name__)

TRACER_NAME = "maas"
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)
# A proxy that binds to the SDK's tracer once the provider is installed (get_tracer per span is costly).
_TRACER = trace.get_tracer(TRACER_NAME)


def configure_telemetry(service_name: str = "maas-web") -> bool:
    """Tracing for a Django process: Django, httpx, psycopg and Celery instrumented.

    Call before the WSGI/ASGI application is created: the Django instrumentation adds its middleware.
    """
    if not configure_tracing(service_name):
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
    if not tracing_enabled():
        return _NO_SPAN
    return tracer().start_as_current_span(name, attributes=_clean(attributes or {}))


def annotate(attributes: Mapping[str, Any]) -> None:
    """Set attributes on the current span (the request's server span in a view)."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_clean(attributes))


def tenant_baggage(organization_id: Any, api_key_id: Any) -> contextlib.AbstractContextManager[None]:
    """Within the block, outgoing calls (httpx) carry the tenant ids as W3C baggage to the engine."""
    if not tracing_enabled():
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
