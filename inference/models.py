"""Model catalog (public models and the engine replicas serving them), quota reservations and usage records."""

from __future__ import annotations

import ipaddress
import re
import socket
from decimal import Decimal
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator
from django.db import models

from accounts.audit import audited
from accounts.models import APIKey, Entitlement, Organization, TenantOwned

PER_MILLION = Decimal(1_000_000)


class Visibility(models.TextChoices):
    ALL = "all", "All organizations"
    LISTED = "listed", "Listed organizations only"


class ToolFormat(models.TextChoices):
    """How tool definitions and calls reach the model's prompt (the engine's `tool_format`, engine/tools.py)."""

    AUTO = "auto", "Chat template if it supports tools, else Hermes-style"
    HERMES = "hermes", "Hermes-style <tool_call> format"


class ModelKind(models.TextChoices):
    """What a model serves: generation (chat and legacy completions) or embeddings; the other endpoints are a 400."""

    CHAT = "chat", "Chat and completions"
    EMBEDDINGS = "embeddings", "Embeddings"


# The /v1 endpoints each kind of model serves.
KIND_ENDPOINTS = {ModelKind.CHAT: ("chat/completions", "completions"), ModelKind.EMBEDDINGS: ("embeddings",)}


@audited()
class AIModel(models.Model):
    """A model as clients see it: `name` is what they send in the `model` field."""

    name = models.CharField(max_length=128, unique=True, help_text="Public name, sent by clients as `model`.")
    display_name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    context_length = models.PositiveIntegerField(default=2048, help_text="Prompt plus completion tokens.")
    enabled = models.BooleanField(default=True)
    visibility = models.CharField(max_length=16, choices=Visibility.choices, default=Visibility.ALL)
    organizations = models.ManyToManyField(
        Organization, blank=True, related_name="visible_models", help_text="Who may use it when visibility is 'listed'."
    )
    price_input_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    price_cached_input_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    price_output_per_million = models.DecimalField(max_digits=12, decimal_places=6, default=Decimal(0))
    batch_discount_percent = models.PositiveSmallIntegerField(
        default=50, validators=[MaxValueValidator(100)],
        help_text="Discount on the prices for lines of the Batch API (/v1/batches), in percent.",
    )
    owned_by = models.CharField(max_length=64, default="maas")
    tool_format = models.CharField(
        max_length=16, choices=ToolFormat.choices, default=ToolFormat.AUTO,
        help_text="How tools reach the prompt; sent to the engine with every chat request.",
    )
    kind = models.CharField(
        max_length=16, choices=ModelKind.choices, default=ModelKind.CHAT,
        help_text="Chat models serve /v1/chat/completions and /v1/completions; embeddings models /v1/embeddings.",
    )
    source = models.CharField(
        max_length=500, blank=True,
        help_text="Where the platform's launcher finds the weights: a path relative to MODELS_DIR, or "
                  "package:NAME for a demo model (inference/sources.py). Empty: replicas are registered by hand.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    fallbacks = models.ManyToManyField(
        "self", through="ModelFallback", through_fields=("model", "fallback"), symmetrical=False, blank=True,
        related_name="+", help_text="Models tried in order when every replica of this one fails before answering.",
    )

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        super().clean()
        if self.source:
            from .sources import SourceError, resolve

            try:
                resolve(self.source)
            except SourceError as exc:
                raise ValidationError({"source": str(exc)}) from None

    @property
    def pricing(self) -> dict[str, str]:
        """Prices per million tokens as exact decimal strings (GET /v1/models, the models page)."""
        return {
            "unit": "per_million_tokens",
            "input": _plain(self.price_input_per_million),
            "cached_input": _plain(self.price_cached_input_per_million),
            "output": _plain(self.price_output_per_million),
            "batch_discount_percent": self.batch_discount_percent,
        }

    def endpoint_refusal(self, endpoint: str) -> str | None:
        """Why this model cannot serve /v1/`endpoint` (None when it can)."""
        if endpoint in KIND_ENDPOINTS[ModelKind(self.kind)]:
            return None
        if self.kind == ModelKind.EMBEDDINGS:
            return f"The model `{self.name}` is an embeddings model: it serves POST /v1/embeddings, not /v1/{endpoint}."
        return (f"The model `{self.name}` does not serve embeddings: it is a generative model "
                "(POST /v1/chat/completions, /v1/completions).")

    def cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
        """Price of one request; cached prompt tokens are billed at the cached-input price."""
        uncached = max(prompt_tokens - cached_tokens, 0)
        total = (
            uncached * self.price_input_per_million
            + cached_tokens * self.price_cached_input_per_million
            + completion_tokens * self.price_output_per_million
        )
        return (total / PER_MILLION).quantize(Decimal("0.00000001"))

    def batch_cost(self, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> Decimal:
        """Price of one line of a batch: `cost` less the model's batch discount."""
        full = self.cost(prompt_tokens, cached_tokens, completion_tokens)
        return (full * (100 - self.batch_discount_percent) / 100).quantize(Decimal("0.00000001"))


class ModelFallback(models.Model):
    """`fallback` answers for `model` when no replica of `model` could (billed at `fallback`'s prices)."""

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="fallback_links")
    fallback = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="+")
    position = models.PositiveSmallIntegerField(default=0, help_text="Lower is tried first.")

    class Meta:
        ordering = ["model", "position", "id"]
        constraints = [models.UniqueConstraint(fields=["model", "fallback"], name="one_fallback_link")]

    def __str__(self) -> str:
        return f"{self.model} → {self.fallback}"

    def clean(self) -> None:
        if self.model_id is not None and self.model_id == self.fallback_id:
            raise ValidationError({"fallback": "A model cannot be its own fallback."})


def _plain(price: Decimal) -> str:
    """0.100000 → "0.1", 2.000000 → "2": the decimal without trailing zeros or exponent."""
    return format(Decimal(price).normalize(), "f")


def upstream_refusal(url: str) -> str | None:
    """Why `url` may not be an engine upstream, or None when it may.

    DEPLOYMENT_ALLOWED_UPSTREAMS lists host names (allowed as written, whatever they resolve to) and
    IP networks (a URL whose host is an address in one, or a name every address of which is in one);
    `*` allows any host. Names are resolved on each call, so a check at save time and at each health
    check sees where the name points now.
    """
    allowed = settings.DEPLOYMENT_ALLOWED_UPSTREAMS
    if "*" in allowed:
        return None
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if not host:
        return "The URL has no host."
    names = {entry.lower() for entry in allowed if not _network(entry)}
    if host in names:
        return None
    networks = [net for net in map(_network, allowed) if net is not None]
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0].split("%")[0]) for info in socket.getaddrinfo(host, None)}
        except (OSError, UnicodeError):
            return f"{host} does not resolve, and it is not in DEPLOYMENT_ALLOWED_UPSTREAMS."
    outside = sorted(str(a) for a in addresses if not any(a in net for net in networks))
    if outside:
        return f"{host} ({', '.join(outside)}) is not in DEPLOYMENT_ALLOWED_UPSTREAMS."
    return None


def _network(entry: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return None


class DeploymentKind(models.TextChoices):
    ENGINE = "engine", "Our engine (python -m engine serve)"
    OPENAI = "openai", "Another OpenAI-compatible server (vLLM, llama.cpp, a cloud provider)"


# Health checks write healthy, last_checked_at and last_error: state, not audit events.
@audited(secret=("internal_token", "api_key_encrypted"), quiet=("healthy", "last_checked_at", "last_error"))
class Deployment(models.Model):
    """One replica serving a model: our engine (`python -m engine serve`) or any OpenAI-compatible server.

    Its base URL must be allowed by DEPLOYMENT_ALLOWED_UPSTREAMS (checked on every save and on each
    health check): the gateway sends it every prompt and the internal token. The `supports_*` flags say
    which of our engine's extensions it accepts; the gateway sends nothing else (inference/upstreams.py)."""

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="deployments")
    base_url = models.URLField(max_length=300, help_text="Engine root, e.g. http://10.0.0.5:8001 (without /v1).")
    served_model_name = models.CharField(
        max_length=128, blank=True, help_text="The model id the engine serves, if not the public name."
    )
    internal_token = models.CharField(max_length=300, blank=True, help_text="Sent upstream as a Bearer token.")
    kind = models.CharField(max_length=16, choices=DeploymentKind.choices, default=DeploymentKind.ENGINE)
    api_key_encrypted = models.TextField(
        blank=True, editable=False,
        help_text="The upstream's API key, encrypted (inference/secrets.py); sent as the Bearer token instead of "
                  "the internal token.",
    )
    supports_cache_salt = models.BooleanField(
        default=True, help_text="Accepts `cache_salt` (per-tenant prefix cache isolation), as our engine and vLLM do.")
    supports_tokenize = models.BooleanField(
        default=True, help_text="Counts tokens at POST /tokenize ({count}), as our engine does.")
    supports_tokenizer = models.BooleanField(
        default=True, help_text="Publishes its tokenizer and chat template at GET /v1/tokenizer, as our engine does.")
    weight = models.PositiveIntegerField(default=1, help_text="Tie-breaker between equally loaded replicas.")
    enabled = models.BooleanField(default=True)
    draining = models.BooleanField(
        default=False, help_text="New requests avoid it; those it is answering finish (take it out gracefully).")
    healthy = models.BooleanField(default=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-weight", "id"]

    def __str__(self) -> str:
        return f"{self.model} @ {self.base_url}"

    def save(self, *args, **kwargs) -> None:
        refusal = upstream_refusal(self.base_url)
        if refusal:
            raise ValidationError({"base_url": refusal})
        super().save(*args, **kwargs)

    @property
    def api_key(self) -> str:
        from .secrets import decrypt

        return decrypt(self.api_key_encrypted) if self.api_key_encrypted else ""

    @api_key.setter
    def api_key(self, value: str) -> None:
        from .secrets import encrypt

        self.api_key_encrypted = encrypt(value) if value else ""

    @property
    def bearer_token(self) -> str:
        """What the gateway sends upstream: the external server's API key, else our engine's internal token."""
        return self.api_key or self.internal_token

    def clean(self) -> None:
        super().clean()
        refusal = upstream_refusal(self.base_url)
        if refusal:
            raise ValidationError({"base_url": refusal})


def usd(amount: Decimal) -> str:
    """Dollars as people read them: to the cent, with the smaller digits only where there are some."""
    cents = amount.quantize(Decimal("0.01"))
    return f"${cents}" if cents == amount else f"${amount.normalize():f}"


# The gateway moves spent and reserved on every request: not audit events; a limit edit is one.
@audited(quiet=("spent", "reserved"))
class Budget(TenantOwned):
    """A spending limit in the catalog's currency: the organization's (no key) or one API key's. The
    gateway holds a request's worst-case cost on it and settles the actual cost, like an entitlement's
    tokens: `spent` and `reserved` move only by conditional UPDATEs (inference/quotas.py)."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="budgets")
    api_key = models.OneToOneField(APIKey, null=True, blank=True, on_delete=models.CASCADE, related_name="budget",
                                   help_text="Empty: the whole organization's budget.")
    limit = models.DecimalField(max_digits=16, decimal_places=8, help_text="The most this may spend, in USD.")
    spent = models.DecimalField(max_digits=20, decimal_places=8, default=Decimal(0))
    reserved = models.DecimalField(max_digits=20, decimal_places=8, default=Decimal(0))
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["organization"], condition=models.Q(api_key__isnull=True),
                                    name="one_budget_per_organization"),
            models.CheckConstraint(condition=models.Q(spent__lte=models.F("limit")), name="budget_spent_within_limit"),
            models.CheckConstraint(condition=models.Q(limit__gte=0), name="budget_limit_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.api_key or self.organization} budget {self.limit}"

    @property
    def remaining(self) -> Decimal:
        return max(Decimal(0), self.limit - self.spent - self.reserved)

    def limit_refusal(self, limit: Decimal) -> str | None:
        """Why `limit` cannot be this budget's limit, None when it can: never negative, never below what is
        spent and held by requests in flight (the counters as this instance read them; the console's and the
        admin's one rule)."""
        if limit < 0:
            return "The limit must be zero or more (remove the budget for no limit)."
        floor = self.spent + self.reserved
        if limit < floor:
            return (f"{usd(self.spent)} is already spent and {usd(self.reserved)} held by requests in flight: "
                    f"the limit cannot be lower than {usd(floor)}.")
        return None

    def used_percent(self) -> float:
        return float(100 * self.spent / self.limit) if self.limit else 100.0


class BudgetNotice(TenantOwned):
    """One row per (budget, threshold, limit) already announced: each warning email goes out once per limit."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="notices")
    threshold = models.CharField(max_length=64, help_text="e.g. budget-80@100.00 (percent of which limit)")
    sent_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["budget", "threshold"], name="one_notice_per_budget_threshold")]


class Reservation(TenantOwned):
    """Tokens (and a worst-case cost, on budgets) held against an entitlement while a request runs; deleted
    when settled, swept when expired."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    entitlement = models.ForeignKey(Entitlement, on_delete=models.CASCADE, related_name="reservations")
    tokens = models.BigIntegerField()
    cost = models.DecimalField(max_digits=16, decimal_places=8, default=Decimal(0))
    key_budget = models.ForeignKey(Budget, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    org_budget = models.ForeignKey(Budget, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    request_id = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"{self.tokens} tokens for {self.request_id}"


class UsageStatus(models.TextChoices):
    OK = "ok", "Completed"
    CLIENT_DISCONNECTED = "client_disconnected", "Client disconnected"
    UPSTREAM_ERROR = "upstream_error", "Upstream error"
    UPSTREAM_TIMEOUT = "upstream_timeout", "Upstream timeout"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable", "Upstream unreachable"
    REJECTED_UPSTREAM = "rejected_upstream", "Rejected by the engine (4xx)"


class UsageSource(models.TextChoices):
    API = "api", "API key"
    PLAYGROUND = "playground", "Console playground"
    BATCH = "batch", "Batch API"


class UsageRecord(TenantOwned):
    """Exactly one per request forwarded upstream."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="usage_records")
    api_key = models.ForeignKey(APIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="usage_records")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    entitlement = models.ForeignKey(Entitlement, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model = models.ForeignKey(AIModel, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model_name = models.CharField(max_length=128)
    deployment = models.ForeignKey(Deployment, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    endpoint = models.CharField(max_length=32)
    prompt_tokens = models.PositiveIntegerField(default=0)
    cached_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    cost = models.DecimalField(max_digits=16, decimal_places=8, default=Decimal(0))
    status = models.CharField(max_length=32, choices=UsageStatus.choices)
    http_status = models.PositiveSmallIntegerField()
    stream = models.BooleanField(default=False)
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    latency_ms = models.FloatField()
    request_id = models.CharField(max_length=64, unique=True)
    source = models.CharField(max_length=16, choices=UsageSource.choices, default=UsageSource.API)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["organization", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id} {self.model_name} {self.status}"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class DailyUsageQuerySet(models.QuerySet):
    def for_org(self, organization: Organization) -> DailyUsageQuerySet:
        return self.filter(organization=organization)

    def totals(self) -> dict[str, int | Decimal]:
        """Sums over the rows selected (the dashboard's headline numbers)."""
        sums = self.aggregate(
            requests=models.Sum("requests"),
            prompt_tokens=models.Sum("prompt_tokens"),
            cached_tokens=models.Sum("cached_tokens"),
            completion_tokens=models.Sum("completion_tokens"),
            cost=models.Sum("cost"),
        )
        return {name: value or 0 for name, value in sums.items()}


class DailyUsage(TenantOwned):
    """Usage of one UTC day per organization, model, API key and source (API or playground), rebuilt from
    UsageRecord by the roll-up task."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="daily_usage")
    day = models.DateField()
    model_name = models.CharField(max_length=128)
    api_key = models.ForeignKey(APIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    source = models.CharField(max_length=16, choices=UsageSource.choices, default=UsageSource.API)
    requests = models.PositiveIntegerField(default=0)
    failed_requests = models.PositiveIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    cached_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    cost = models.DecimalField(max_digits=20, decimal_places=8, default=Decimal(0))
    updated_at = models.DateTimeField(auto_now=True)

    objects = DailyUsageQuerySet.as_manager()

    class Meta:
        ordering = ["-day", "model_name"]
        verbose_name_plural = "daily usage"
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "day", "model_name", "api_key", "source"], name="one_daily_usage_row",
                nulls_distinct=False,
            )
        ]

    def __str__(self) -> str:
        return f"{self.organization} {self.day} {self.model_name}"


class EntitlementNotice(TenantOwned):
    """One row per (entitlement, threshold) already announced: each warning email goes out once."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    entitlement = models.ForeignKey(Entitlement, on_delete=models.CASCADE, related_name="notices")
    threshold = models.CharField(max_length=32, help_text="e.g. quota-80, quota-100, ends-7d, ends-1d")
    sent_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-sent_at"]
        constraints = [models.UniqueConstraint(fields=["entitlement", "threshold"], name="one_notice_per_threshold")]

    def __str__(self) -> str:
        return f"{self.entitlement} {self.threshold}"


class StoredResponse(TenantOwned):
    """A /v1/responses answer kept for retrieval and for `previous_response_id` (`store`, the default).

    `history` is the conversation a continuation starts from: the previous turns' and this turn's input
    messages and this turn's answer, without `instructions` (OpenAI does not carry them over)."""

    response_id = models.CharField(max_length=64, unique=True)
    api_key = models.ForeignKey(APIKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    model_name = models.CharField(max_length=128)
    body = models.JSONField(help_text="The response object as the API returned it.")
    input_items = models.JSONField(help_text="This turn's input items (GET /v1/responses/{id}/input_items).")
    history = models.JSONField(help_text="Chat messages a continuation starts from.")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True, help_text="RESPONSES_RETENTION_DAYS after creation.")

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.response_id


class ReplicaState(models.TextChoices):
    """What the operator wants (`desired`) of a platform-run replica."""

    RUNNING = "running", "Running"
    STOPPED = "stopped", "Stopped"


class ReplicaStatus(models.TextChoices):
    """What the launcher last saw (`status`)."""

    PENDING = "pending", "Pending (no launcher has picked it up)"
    STARTING = "starting", "Starting"
    RUNNING = "running", "Running"
    BACKOFF = "backoff", "Exited; restarting after a backoff"
    STOPPED = "stopped", "Stopped"
    FAILED = "failed", "Failed (cannot start: see the last error)"


class EngineQuantization(models.TextChoices):
    AUTO = "auto", "The checkpoint's (quantized weights stay packed where the engine's kernels take them)"
    DENSE = "dense", "Dense (GGUF weights dequantized to the dtype at load: more memory)"


class EngineDtype(models.TextChoices):
    AUTO = "", "Engine default (bfloat16 on CUDA and for a quantized GGUF on a bfloat16 CPU, else float32)"
    BFLOAT16 = "bfloat16", "bfloat16"
    FLOAT16 = "float16", "float16"
    FLOAT32 = "float32", "float32"


# The launcher writes these while it watches the process: state, not audit events.
REPLICA_RUNTIME_FIELDS = ("status", "pid", "port", "restarts", "last_error", "log_tail", "started_at",
                          "last_seen_at", "running_generation")


@audited(quiet=REPLICA_RUNTIME_FIELDS)
class Replica(models.Model):
    """An engine process the platform runs for a model (`python -m engine serve`, started by the launcher,
    `manage.py launcher`, or rendered for Kubernetes by `manage.py render_k8s`).

    The operator sets `desired` and the engine options; the launcher reconciles, registers the process as
    `deployment` (the gateway routes to it like any replica) and writes the runtime fields."""

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="replicas")
    desired = models.CharField(max_length=16, choices=ReplicaState.choices, default=ReplicaState.RUNNING)
    generation = models.PositiveIntegerField(default=1, help_text="Bumped by *restart*: the launcher restarts "
                                             "a process started for an older generation.")
    dtype = models.CharField(max_length=16, choices=EngineDtype.choices, blank=True, default=EngineDtype.AUTO)
    quantization = models.CharField(max_length=8, choices=EngineQuantization.choices,
                                    default=EngineQuantization.AUTO)
    device = models.CharField(max_length=32, default="cpu", help_text="cpu, cuda or cuda:N.")
    kv_cache_memory = models.CharField(max_length=32, blank=True,
                                       help_text="KV-cache pool, e.g. 2GiB (default: the engine's).")
    max_num_seqs = models.PositiveIntegerField(default=64, help_text="Most sequences in one batch.")
    max_model_len = models.PositiveIntegerField(null=True, blank=True,
                                                help_text="Context length cap (default: the model's).")
    deployment = models.OneToOneField(Deployment, null=True, blank=True, on_delete=models.SET_NULL,
                                      related_name="replica", editable=False)
    status = models.CharField(max_length=16, choices=ReplicaStatus.choices, default=ReplicaStatus.PENDING)
    pid = models.PositiveIntegerField(null=True, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    running_generation = models.PositiveIntegerField(null=True, blank=True)
    restarts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    log_tail = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "id"]
        permissions = [("operate_replica", "Can start, stop and restart engine replicas")]

    def __str__(self) -> str:
        return f"{self.model} replica {self.pk}"

    def clean(self) -> None:
        super().clean()
        if self.kv_cache_memory:
            from engine.support import parse_bytes

            try:
                parse_bytes(self.kv_cache_memory)
            except ValueError as exc:
                raise ValidationError({"kv_cache_memory": str(exc)}) from None
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValidationError({"device": "Expected cpu, cuda or cuda:N."})


from .batch_models import Batch, BatchLine, StoredFile  # noqa: E402,F401  (registered with the app)
