"""Users, organizations (tenants), memberships, authorization codes, entitlements and API keys.

Every tenant-owned row subclasses `TenantOwned`: its default manager has `for_org(org)`, the one
way a request-serving query is scoped to the caller's organization.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid

from django.conf import settings
from django.contrib.auth.models import AbstractUser, BaseUserManager
from django.db import models
from django.db.models import F, Q
from django.utils import timezone
from django.utils.text import slugify

from .audit import audited


def keyed_hash(secret: str) -> str:
    """HMAC-SHA256 of a secret with the server-side key: a leaked table reveals no usable secret."""
    return hmac.new(settings.API_KEY_HMAC_SECRET.encode(), secret.encode(), hashlib.sha256).hexdigest()


class UserManager(BaseUserManager["User"]):
    use_in_migrations = True

    def _create_user(self, email: str, password: str | None, **extra) -> User:
        if not email:
            raise ValueError("An email address is required.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save(using=self._db)
        return user

    def create_user(self, email: str, password: str | None = None, **extra) -> User:
        extra.setdefault("is_staff", False)
        extra.setdefault("is_superuser", False)
        return self._create_user(email, password, **extra)

    def create_superuser(self, email: str, password: str | None = None, **extra) -> User:
        extra.setdefault("is_staff", True)
        extra.setdefault("is_superuser", True)
        return self._create_user(email, password, **extra)


@audited(secret=("password",), quiet=("last_login",))
class User(AbstractUser):
    """A person; the email address is the login."""

    username = None
    email = models.EmailField("email address", unique=True)

    USERNAME_FIELD = "email"
    REQUIRED_FIELDS: list[str] = []

    objects = UserManager()

    class Meta:
        ordering = ["email"]

    def __str__(self) -> str:
        return self.email


@audited(secret=("cache_salt",))
class Organization(models.Model):
    """A tenant: owns keys, entitlements, usage; members act on its behalf."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    # Enters the engine's prefix-cache hash so tenants never share cached KV blocks.
    cache_salt = models.CharField(max_length=64, default=secrets.token_hex, editable=False)
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit.")
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit.")
    max_concurrent_requests = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit.")
    is_active = models.BooleanField(default=True)
    require_mfa = models.BooleanField(
        default=False, help_text="Members must set up a second factor (TOTP) before they use the console."
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @classmethod
    def unique_slug(cls, base: str) -> str:
        root = slugify(base)[:50] or "org"
        slug, n = root, 1
        while cls.objects.filter(slug=slug).exists():
            n += 1
            slug = f"{root}-{n}"
        return slug


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"


class TenantQuerySet(models.QuerySet):
    def for_org(self, organization: Organization) -> TenantQuerySet:
        return self.filter(organization=organization)


class TenantOwned(models.Model):
    """Base for every row that belongs to one organization."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")

    objects = TenantQuerySet.as_manager()

    class Meta:
        abstract = True


@audited()
class Membership(TenantOwned):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["organization", "user"], name="unique_membership")]
        ordering = ["organization", "user"]

    def __str__(self) -> str:
        return f"{self.user} in {self.organization} ({self.role})"

    @property
    def can_manage(self) -> bool:
        return self.role in (Role.OWNER, Role.ADMIN)


@audited(secret=("token_hash",))
class Invitation(TenantOwned):
    """An email invitation to join an organization; the token is stored hashed."""

    email = models.EmailField()
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.email} → {self.organization}"


@audited(secret=("code_hash",))
class AuthorizationCode(models.Model):
    """An admin-issued secret that grants an entitlement when redeemed. Stored hashed."""

    prefix = models.CharField(max_length=16, db_index=True, editable=False, help_text="Visible part, for lookup.")
    code_hash = models.CharField(max_length=64, unique=True, editable=False)
    batch = models.UUIDField(default=uuid.uuid4, db_index=True, editable=False)
    token_quota = models.BigIntegerField(null=True, blank=True, help_text="Empty: unlimited tokens.")
    validity_days = models.PositiveIntegerField(null=True, blank=True, help_text="Days after redemption; empty: no end.")
    model_names = models.JSONField(default=list, blank=True, help_text="Public model names; empty: every model.")
    max_redemptions = models.PositiveIntegerField(default=1)
    redemption_count = models.PositiveIntegerField(default=0, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Last moment it can be redeemed.")
    revoked_at = models.DateTimeField(null=True, blank=True)
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(redemption_count__lte=F("max_redemptions")), name="code_redemptions_within_max"
            )
        ]

    def __str__(self) -> str:
        return f"{self.prefix}…"


class EntitlementQuerySet(TenantQuerySet):
    def active(self, now=None) -> EntitlementQuerySet:
        """Not revoked, started and not ended at `now`. An exhausted quota still counts as active:
        the gateway refuses on the quota itself, with its own message."""
        now = now or timezone.now()
        return self.filter(revoked_at__isnull=True, starts_at__lte=now).filter(Q(ends_at__isnull=True) | Q(ends_at__gt=now))


# The gateway moves tokens_used and tokens_reserved on every request: not audit events.
@audited(quiet=("tokens_used", "tokens_reserved"))
class Entitlement(TenantOwned):
    """What an organization may consume: granted by redeeming a code (or by an admin)."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="entitlements")
    code = models.ForeignKey(AuthorizationCode, null=True, blank=True, on_delete=models.PROTECT, related_name="entitlements")
    token_quota = models.BigIntegerField(null=True, blank=True, help_text="Empty: unlimited tokens.")
    # Settled usage and in-flight reservations; updated only with atomic conditional UPDATEs.
    tokens_used = models.BigIntegerField(default=0)
    tokens_reserved = models.BigIntegerField(default=0)
    model_names = models.JSONField(default=list, blank=True, help_text="Public model names; empty: every model.")
    starts_at = models.DateTimeField(default=timezone.now)
    ends_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = EntitlementQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "code"], name="one_entitlement_per_code_and_org"),
            models.CheckConstraint(
                condition=Q(token_quota__isnull=True) | Q(tokens_used__lte=F("token_quota")),
                name="entitlement_usage_within_quota",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.organization} entitlement #{self.pk}"

    @property
    def tokens_remaining(self) -> int | None:
        """Tokens that can still be reserved (quota minus used minus in flight); None: unlimited."""
        if self.token_quota is None:
            return None
        return max(0, self.token_quota - self.tokens_used - self.tokens_reserved)

    def is_active(self, now=None) -> bool:
        """Same rule as `EntitlementQuerySet.active`, for one loaded row."""
        now = now or timezone.now()
        return self.revoked_at is None and self.starts_at <= now and (self.ends_at is None or self.ends_at > now)

    def allows_model(self, model_name: str) -> bool:
        return not self.model_names or model_name in self.model_names


class APIKeyQuerySet(TenantQuerySet):
    def create_key(self, organization: Organization, name: str, **fields) -> tuple[APIKey, str]:
        """Create a key; the returned raw key is the only time it exists in full."""
        public_id = secrets.token_hex(8)
        raw = f"{APIKey.PREFIX}{public_id}-{secrets.token_urlsafe(32)}"
        key = self.create(organization=organization, name=name, public_id=public_id, secret_hash=keyed_hash(raw), **fields)
        return key, raw

    def get_by_raw(self, raw: str) -> APIKey | None:
        """The key whose hash matches `raw`, usable or not (callers check `is_usable`)."""
        public_id = APIKey.parse_public_id(raw)
        if public_id is None:
            return None
        key = self.select_related("organization").filter(public_id=public_id).first()
        if key is None or not hmac.compare_digest(key.secret_hash, keyed_hash(raw)):
            return None
        return key


class KeyKind(models.TextChoices):
    MEMBER = "member", "Member key"
    SERVICE = "service", "Organization service key"


# last_used_at is written on every request the key makes: not an audit event.
@audited(secret=("secret_hash",), quiet=("last_used_at",))
class APIKey(TenantOwned):
    """`sk-<public id>-<secret>`; only an HMAC of the whole key is stored.

    A member key belongs to its creator: it is revoked when their membership in the organization ends
    or the user is deactivated or deleted (accounts/signals.py). A service key belongs to the
    organization (created by owners, admins or operators) and stays until revoked. Rolling a key makes
    a successor (`rotated_from`) and ends the old one after a grace period (its `expires_at`)."""

    PREFIX = "sk-"

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="api_keys")
    public_id = models.CharField(max_length=32, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    name = models.CharField(max_length=100)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    allowed_models = models.JSONField(default=list, blank=True, help_text="Public model names; empty: every model.")
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    kind = models.CharField(max_length=16, choices=KeyKind.choices, default=KeyKind.MEMBER)
    rotated_from = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="successor", editable=False,
        help_text="The key this one replaced when it was rolled.",
    )

    objects = APIKeyQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} (sk-{self.public_id}…)"

    @classmethod
    def parse_public_id(cls, raw: str) -> str | None:
        """The public id of a well-formed key, or None for anything malformed."""
        if not raw.startswith(cls.PREFIX):
            return None
        public_id, sep, secret = raw[len(cls.PREFIX):].partition("-")
        if not sep or len(public_id) != 16 or len(secret) < 32 or not all(c in "0123456789abcdef" for c in public_id):
            return None
        return public_id

    @property
    def redacted(self) -> str:
        return f"{self.PREFIX}{self.public_id}-…"

    def is_usable(self, now=None) -> bool:
        now = now or timezone.now()
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now) and self.organization.is_active

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= timezone.now():
            return "expired"
        return "active"

    def revoke(self) -> None:
        """Idempotent; a conditional UPDATE so the first revocation time is kept."""
        if self.revoked_at is None:
            now = timezone.now()
            APIKey.objects.filter(pk=self.pk, revoked_at__isnull=True).update(revoked_at=now)
            self.refresh_from_db(fields=["revoked_at"])
