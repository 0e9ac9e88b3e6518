"""The catalog as the gateway reads it: a per-process snapshot refreshed every few seconds, and which of
a model's deployments can take a request now (enabled, healthy, not benched, not draining). The choice
among those, shared by every gateway process, is inference/routing.py's; `pick` (fewest in flight in
this process) is its fallback when Redis cannot be reached.

Health has two sources: the periodic check (`check_deployments`, run by Celery beat) stored in the
database, and this process's own observations: a connect failure benches a deployment for
`GATEWAY_UNHEALTHY_BACKOFF_SECONDS` without waiting for the next periodic check.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import httpx
from django.conf import settings
from django.utils import timezone

from .models import AIModel, Deployment, DeploymentKind, Visibility, upstream_refusal

logger = logging.getLogger(__name__)


class ModelStatus:
    UP, DEGRADED, DOWN = "up", "degraded", "down"


@dataclass(frozen=True)
class Upstream:
    id: int
    base_url: str
    served_model_name: str
    internal_token: str
    weight: int
    healthy: bool
    kind: str = DeploymentKind.ENGINE
    draining: bool = False
    supports_cache_salt: bool = True
    supports_tokenize: bool = True
    supports_tokenizer: bool = True

    @property
    def is_engine(self) -> bool:
        """Our engine: it takes our other extensions (tool_format) and publishes GET /load."""
        return self.kind == DeploymentKind.ENGINE

    @classmethod
    def of(cls, deployment: Deployment, public_name: str) -> Upstream:
        d = deployment
        return cls(d.pk, d.base_url.rstrip("/"), d.served_model_name or public_name, d.bearer_token, d.weight,
                   d.healthy, d.kind, d.draining, d.supports_cache_salt, d.supports_tokenize, d.supports_tokenizer)


@dataclass(frozen=True)
class CatalogEntry:
    model: AIModel
    visible_to: frozenset[int] | None  # organization ids; None: every organization
    upstreams: tuple[Upstream, ...]
    fallbacks: tuple[str, ...] = ()  # model names tried in order when no replica of this one answers

    def visible_for(self, organization_id: int) -> bool:
        return self.visible_to is None or organization_id in self.visible_to

    @property
    def status(self) -> str:
        """From the replicas' last health checks: `up` when every enabled replica passed, `degraded` when
        some did (requests still go through, on fewer replicas), `down` when none did (503)."""
        healthy = sum(u.healthy for u in self.upstreams)
        if self.upstreams and healthy == len(self.upstreams):
            return ModelStatus.UP
        return ModelStatus.DEGRADED if healthy else ModelStatus.DOWN


class Catalog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, CatalogEntry] = {}
        self._loaded_at = float("-inf")
        self.in_flight: dict[int, int] = {}
        self.benched_until: dict[int, float] = {}

    def entries(self) -> dict[str, CatalogEntry]:
        """Enabled models by public name (database read at most every GATEWAY_CATALOG_CACHE_SECONDS)."""
        if time.monotonic() - self._loaded_at > settings.GATEWAY_CATALOG_CACHE_SECONDS:
            with self._lock:
                if time.monotonic() - self._loaded_at > settings.GATEWAY_CATALOG_CACHE_SECONDS:
                    self._entries = self.load_entries()
                    self._loaded_at = time.monotonic()
        return self._entries

    def cached_entries(self) -> dict[str, CatalogEntry] | None:
        """The snapshot if still fresh, None when it is due for a database read."""
        if time.monotonic() - self._loaded_at > settings.GATEWAY_CATALOG_CACHE_SECONDS:
            return None
        return self._entries

    def invalidate(self) -> None:
        self._loaded_at = float("-inf")

    @staticmethod
    def load_entries() -> dict[str, CatalogEntry]:
        """The catalog from the database now (what `entries` caches)."""
        entries = {}
        models = AIModel.objects.filter(enabled=True).prefetch_related(
            "organizations", "deployments", "fallback_links__fallback")
        for model in models:
            visible_to = None
            if model.visibility == Visibility.LISTED:
                visible_to = frozenset(org.pk for org in model.organizations.all())
            upstreams = tuple(Upstream.of(d, model.name) for d in model.deployments.all() if d.enabled)
            fallbacks = tuple(link.fallback.name for link in model.fallback_links.all())
            entries[model.name] = CatalogEntry(model, visible_to, upstreams, fallbacks)
        return entries

    def available(self, entry: CatalogEntry, exclude: frozenset[int] = frozenset()) -> list[Upstream]:
        """The replicas that may take a new request: healthy, not benched here, not draining."""
        now = time.monotonic()
        return [u for u in entry.upstreams if u.healthy and not u.draining and u.id not in exclude
                and self.benched_until.get(u.id, 0) <= now]

    def pick(self, entry: CatalogEntry, exclude: frozenset[int] = frozenset()) -> Upstream | None:
        """An available upstream with the fewest requests in flight here; higher weight wins ties."""
        candidates = self.available(entry, exclude)
        if not candidates:
            return None
        return min(candidates, key=lambda u: (self.in_flight.get(u.id, 0) / max(u.weight, 1), -u.weight, u.id))

    def started(self, upstream: Upstream) -> None:
        self.in_flight[upstream.id] = self.in_flight.get(upstream.id, 0) + 1

    def finished(self, upstream: Upstream) -> None:
        self.in_flight[upstream.id] = max(self.in_flight.get(upstream.id, 0) - 1, 0)

    def bench(self, upstream: Upstream) -> None:
        """This process could not reach it: skip it for a few seconds."""
        self.benched_until[upstream.id] = time.monotonic() + settings.GATEWAY_UNHEALTHY_BACKOFF_SECONDS


catalog = Catalog()


def check_deployment(deployment: Deployment, client: httpx.Client) -> bool:
    """GET {base_url}/health (an external server: /v1/models); stores the result on the row."""
    token = deployment.bearer_token
    headers = {"authorization": f"Bearer {token}"} if token else {}
    error = upstream_refusal(deployment.base_url) or ""  # no request (nor token) to a host no longer allowed
    # Our engine answers GET /health; any OpenAI-compatible server answers GET /v1/models.
    path = "/health" if deployment.kind == DeploymentKind.ENGINE else "/v1/models"
    try:
        if error:
            healthy = False
        else:
            response = client.get(f"{deployment.base_url.rstrip('/')}{path}", headers=headers)
            healthy = response.status_code == 200
            if not healthy:
                error = f"{path} answered {response.status_code}"
    except httpx.HTTPError as exc:
        healthy, error = False, f"{type(exc).__name__}: {exc}"[:500]
    if healthy != deployment.healthy:
        logger.warning("deployment %s is now %s %s", deployment, "healthy" if healthy else "unhealthy", error)
    Deployment.objects.filter(pk=deployment.pk).update(healthy=healthy, last_checked_at=timezone.now(), last_error=error)
    deployment.healthy, deployment.last_error = healthy, error
    return healthy


def check_deployments() -> dict[str, int]:
    """Health-check every enabled deployment (the periodic task calls this). Returns counts."""
    counts = {"healthy": 0, "unhealthy": 0}
    with httpx.Client(timeout=settings.GATEWAY_HEALTH_CHECK_TIMEOUT) as client:
        for deployment in Deployment.objects.filter(enabled=True):
            counts["healthy" if check_deployment(deployment, client) else "unhealthy"] += 1
    return counts
