"""Prometheus metrics of the gateway, served on GET /metrics to holders of METRICS_TOKEN.

Several uvicorn workers are several processes: with PROMETHEUS_MULTIPROC_DIR set (compose sets it on
a tmpfs), prometheus-client keeps each process's samples in that directory and the view adds them up.
Deployment health is read from the database at scrape time, so every process reports the same value
whichever process (the Celery health-check task) wrote it.
"""

from __future__ import annotations

import hmac
import os

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from .models import Deployment, UsageStatus

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)

REQUESTS = Counter(
    "maas_gateway_requests",
    "Requests answered under /v1/, by model, organization (slug) and HTTP status code.",
    ["model", "organization", "status"],
)
REQUEST_DURATION = Histogram(
    "maas_gateway_request_duration_seconds",
    "Time from the request's arrival to the last byte of the engine's answer, for forwarded requests.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "maas_gateway_time_to_first_token_seconds",
    "Time from the request's arrival to the first generated token relayed to the client.",
    ["model"],
    buckets=TTFT_BUCKETS,
)
PROMPT_TOKENS = Counter(
    "maas_gateway_prompt_tokens", "Prompt (input) tokens of forwarded requests.", ["model", "organization"]
)
CACHED_PROMPT_TOKENS = Counter(
    "maas_gateway_cached_prompt_tokens", "Prompt tokens served from the engine's prefix cache.", ["model", "organization"]
)
COMPLETION_TOKENS = Counter(
    "maas_gateway_completion_tokens", "Completion (output) tokens of forwarded requests.", ["model", "organization"]
)
UPSTREAM_RETRIES = Counter(
    "maas_gateway_upstream_retries",
    "Requests retried on a fresh connection after a reused pooled one failed before any response byte "
    "(the idle keep-alive race), by error (RemoteProtocolError, ReadError, WriteError).",
    ["reason"],
)
QUOTA_REJECTIONS = Counter(
    "maas_gateway_quota_rejections",
    "Requests refused before reaching an engine: reason is insufficient_quota (entitlement) or rate_limit_exceeded.",
    ["organization", "reason"],
)
UPSTREAM_ERRORS = Counter(
    "maas_gateway_upstream_errors",
    "Forwarded requests that failed at the engine, by kind (upstream_error, upstream_timeout, "
    "upstream_unavailable, rejected_upstream).",
    ["model", "deployment", "kind"],
)

REJECTION_CODES = {"insufficient_quota", "rate_limit_exceeded"}
UPSTREAM_FAILURES = {s.value for s in UsageStatus} - {UsageStatus.OK, UsageStatus.CLIENT_DISCONNECTED}


def observe_response(request: HttpRequest, status: int, error_code: str | None = None) -> None:
    """Count one /v1/ answer; labels the view learned (`request.metric_labels`) or empty strings."""
    labels = getattr(request, "metric_labels", {})
    organization = labels.get("organization", "")
    REQUESTS.labels(labels.get("model", ""), organization, str(status)).inc()
    if error_code in REJECTION_CODES:
        QUOTA_REJECTIONS.labels(organization, error_code).inc()


def observe_usage(model: str, organization: str, deployment_id: int | None, meter) -> None:
    """Record a forwarded request once it is settled (a `proxy.Meter`)."""
    REQUEST_DURATION.labels(model).observe(meter.latency_ms / 1000)
    if meter.ttft_ms is not None:
        TIME_TO_FIRST_TOKEN.labels(model).observe(meter.ttft_ms / 1000)
    PROMPT_TOKENS.labels(model, organization).inc(meter.prompt_tokens or 0)
    CACHED_PROMPT_TOKENS.labels(model, organization).inc(meter.cached_tokens or 0)
    COMPLETION_TOKENS.labels(model, organization).inc(meter.completion_tokens or 0)
    if meter.status in UPSTREAM_FAILURES:
        UPSTREAM_ERRORS.labels(model, str(deployment_id or ""), meter.status).inc()


class DeploymentHealthCollector:
    """maas_gateway_deployment_healthy: 1 healthy, 0 not, per enabled deployment, read at scrape time."""

    def collect(self):
        family = GaugeMetricFamily(
            "maas_gateway_deployment_healthy",
            "1 when the deployment's last health check passed, 0 otherwise (enabled deployments only).",
            labels=["model", "deployment", "base_url"],
        )
        rows = Deployment.objects.filter(enabled=True).values_list("model__name", "pk", "base_url", "healthy")
        for model, pk, base_url, healthy in rows:
            family.add_metric([model, str(pk), base_url], 1.0 if healthy else 0.0)
        yield family


def exposition() -> bytes:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(DeploymentHealthCollector())
        return generate_latest(registry)
    registry = CollectorRegistry()
    registry.register(DeploymentHealthCollector())
    return generate_latest(REGISTRY) + generate_latest(registry)


def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics with `Authorization: Bearer <METRICS_TOKEN>`; 404 while no token is configured."""
    token = settings.METRICS_TOKEN
    if not token:
        return HttpResponse("Not found.\n", status=404, content_type="text/plain")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        response = HttpResponse("A valid metrics token is required.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(exposition(), content_type=CONTENT_TYPE_LATEST)
