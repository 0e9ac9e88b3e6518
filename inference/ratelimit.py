"""Requests-per-minute and tokens-per-minute limits per key and per organization, plus the optional
per-organization cap on concurrent requests.

Token buckets: each limit is a bucket of `limit` units refilled at `limit` per minute. One request checks
every bucket that applies and consumes from all of them only if all have room, atomically: in Redis with
one Lua script (shared by every gateway process), or in this process when Redis is not configured.
When Redis is configured but unreachable, `GATEWAY_RATELIMIT_ON_REDIS_ERROR` decides: "refuse" (503) or
"local" (fall back to per-process buckets).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field

from django.conf import settings

from .errors import GatewayError, service_unavailable

logger = logging.getLogger(__name__)

WINDOW_MS = 60_000
BUCKET_TTL_MS = 2 * WINDOW_MS

# KEYS: bucket keys, then the concurrency key (or none). ARGV: capacity and cost per bucket, then the
# concurrency cap (0: none), the request's slot id and the slot's lifetime in ms. Returns {allowed,
# wait_ms, denied_by, remaining_1, reset_ms_1, ...}; denied_by is the 1-based bucket index, or n+1 for
# the concurrency cap. The concurrency slots are a sorted set of slot ids scored by expiry: a slot whose
# request never released it (crashed worker) drops out once it expires, whatever traffic follows; live
# requests push their slot's expiry ahead (LUA_EXTEND).
LUA_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local cap_concurrency = tonumber(ARGV[#ARGV - 2])
local slot, slot_ttl = ARGV[#ARGV - 1], tonumber(ARGV[#ARGV])
if cap_concurrency > 0 then n = n - 1 end
local levels = {}
local allowed = 1
local wait = 0
local denied_by = 0
for i = 1, n do
  local cap = tonumber(ARGV[2 * i - 1])
  local cost = tonumber(ARGV[2 * i])
  local state = redis.call('HMGET', KEYS[i], 'v', 't')
  local v = tonumber(state[1])
  local ts = tonumber(state[2])
  if v == nil then v = cap; ts = now end
  local rate = cap / 60000.0
  v = math.min(cap, v + math.max(now - ts, 0) * rate)
  levels[i] = v
  if cost > v then
    allowed = 0
    local w = (cost - v) / rate
    if w > wait then wait = w; denied_by = i end
  end
end
if allowed == 1 and cap_concurrency > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', now)
  if redis.call('ZCARD', KEYS[n + 1]) >= cap_concurrency then allowed = 0; denied_by = n + 1; wait = 1000 end
end
local out = {allowed, math.ceil(wait), denied_by}
for i = 1, n do
  local cap = tonumber(ARGV[2 * i - 1])
  local v = levels[i]
  if allowed == 1 then v = v - tonumber(ARGV[2 * i]) end
  redis.call('HSET', KEYS[i], 'v', tostring(v), 't', now)
  redis.call('PEXPIRE', KEYS[i], BUCKET_TTL_MS)
  out[#out + 1] = math.floor(v)
  out[#out + 1] = math.ceil((cap - v) / (cap / 60000.0))
end
if allowed == 1 and cap_concurrency > 0 then
  redis.call('ZADD', KEYS[n + 1], now + slot_ttl, slot)
  redis.call('PEXPIRE', KEYS[n + 1], slot_ttl)
end
return out
""".replace("BUCKET_TTL_MS", str(BUCKET_TTL_MS))

# KEYS: the concurrency key. ARGV: the slot id and its lifetime in ms. A live request's slot expires later.
LUA_EXTEND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""


# KEYS: the token buckets to refund, then the concurrency key (or none). ARGV: the refund, each bucket's
# capacity, then the slot id ('' without a concurrency key). A refund never lifts a bucket above its
# capacity.
LUA_RELEASE = """
local refund = tonumber(ARGV[1])
local slot = ARGV[#ARGV]
local n = #KEYS
if slot ~= '' then n = n - 1 end
for i = 1, n do
  local v = tonumber(redis.call('HGET', KEYS[i], 'v'))
  if v ~= nil then
    redis.call('HSET', KEYS[i], 'v', tostring(math.min(tonumber(ARGV[i + 1]), v + refund)))
  end
end
if slot ~= '' then
  redis.call('ZREM', KEYS[n + 1], slot)
end
return 1
"""


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them in x-ratelimit-reset-*: `20ms`, `1s`, `1.5s`, `6m0s`."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True)
class Bucket:
    key: str
    kind: str  # "requests" or "tokens"
    capacity: int
    cost: int


@dataclass
class Decision:
    allowed: bool
    retry_after_ms: int = 0
    denied_kind: str | None = None  # "requests", "tokens" or "concurrency"
    headers: dict[str, str] = field(default_factory=dict)
    concurrency_key: str | None = None
    concurrency_slot: str = ""  # this request's member of the concurrency set
    local: bool = False  # decided by this process's buckets (no Redis)
    token_buckets: tuple[tuple[str, int], ...] = ()  # (key, capacity) of the tokens-per-minute buckets charged
    token_cost: int = 0  # what each of them was charged (the hold); the unused part is refunded on release


def buckets_for(api_key, organization, tokens: int) -> list[Bucket]:
    """Every limit that applies to one request. A key limit left empty (or no key: the playground) does
    not apply; an organization's falls back to the platform default (GATEWAY_DEFAULT_ORG_*_PER_MINUTE),
    so every response carries x-ratelimit-* headers unless an operator sets that default to 0."""
    limits = (
        *([("key", api_key, api_key.requests_per_minute, api_key.tokens_per_minute)] if api_key is not None else []),
        ("org", organization,
         organization.requests_per_minute or settings.GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE,
         organization.tokens_per_minute or settings.GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE),
    )
    buckets = []
    for scope, owner, requests_per_minute, tokens_per_minute in limits:
        if requests_per_minute:
            buckets.append(Bucket(f"rl:{scope}:{owner.pk}:req", "requests", requests_per_minute, 1))
        if tokens_per_minute:
            buckets.append(Bucket(f"rl:{scope}:{owner.pk}:tok", "tokens", tokens_per_minute, tokens))
    return buckets


def decide(buckets: list[Bucket], raw: list[int], concurrency_key: str | None) -> Decision:
    """Turn the script's answer into a decision and OpenAI's x-ratelimit-* headers (tightest bucket wins)."""
    allowed, wait_ms, denied_by = bool(raw[0]), int(raw[1]), int(raw[2])
    headers: dict[str, str] = {}
    tightest: dict[str, tuple[int, int, int]] = {}
    for i, bucket in enumerate(buckets):
        remaining, reset_ms = int(raw[3 + 2 * i]), int(raw[4 + 2 * i])
        best = tightest.get(bucket.kind)
        if best is None or remaining < best[1]:
            tightest[bucket.kind] = (bucket.capacity, max(remaining, 0), reset_ms)
    for kind, (limit, remaining, reset_ms) in tightest.items():
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        headers[f"x-ratelimit-reset-{kind}"] = format_duration(reset_ms / 1000)
    if denied_by == 0:
        denied_kind = None
    elif denied_by > len(buckets):
        denied_kind = "concurrency"
    else:
        denied_kind = buckets[denied_by - 1].kind
    return Decision(allowed, wait_ms, denied_kind, headers, concurrency_key if allowed else None)


class LocalLimiter:
    """The same buckets in this process's memory: for a single process without Redis, or as fallback."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._levels: dict[str, tuple[float, float]] = {}
        self._slots: dict[str, dict[str, float]] = {}  # concurrency key -> {slot id: expiry (ms)}

    def acquire(self, buckets: list[Bucket], concurrency_key: str | None, concurrency_cap: int, slot: str = "",
                slot_ttl_ms: int = 0) -> list[int]:
        now = time.monotonic() * 1000
        with self._lock:
            levels, allowed, wait, denied_by = [], 1, 0.0, 0
            for i, b in enumerate(buckets):
                v, ts = self._levels.get(b.key, (float(b.capacity), now))
                rate = b.capacity / WINDOW_MS
                v = min(b.capacity, v + max(now - ts, 0) * rate)
                levels.append(v)
                if b.cost > v:
                    allowed = 0
                    w = (b.cost - v) / rate
                    if w > wait:
                        wait, denied_by = w, i + 1
            slots = self._slots.setdefault(concurrency_key, {}) if concurrency_key else {}
            for stale in [k for k, expiry in slots.items() if expiry <= now]:
                del slots[stale]  # a crashed request's slot
            if allowed and concurrency_key and len(slots) >= concurrency_cap:
                allowed, denied_by, wait = 0, len(buckets) + 1, 1000
            out = [allowed, math.ceil(wait), denied_by]
            for b, v in zip(buckets, levels, strict=True):
                if allowed:
                    v -= b.cost
                self._levels[b.key] = (v, now)
                out += [math.floor(v), math.ceil((b.capacity - v) / (b.capacity / WINDOW_MS))]
            if allowed and concurrency_key:
                slots[slot] = now + slot_ttl_ms
            return out

    def extend(self, concurrency_key: str, slot: str, slot_ttl_ms: int) -> None:
        with self._lock:
            slots = self._slots.get(concurrency_key, {})
            if slot in slots:
                slots[slot] = time.monotonic() * 1000 + slot_ttl_ms

    def release(self, concurrency_key: str | None, slot: str = "", token_buckets: tuple[tuple[str, int], ...] = (),
                refund: int = 0) -> None:
        with self._lock:
            if concurrency_key is not None:
                self._slots.get(concurrency_key, {}).pop(slot, None)
            for key, capacity in token_buckets if refund > 0 else ():
                if key in self._levels:
                    level, at = self._levels[key]
                    self._levels[key] = (min(float(capacity), level + refund), at)

    def reset(self) -> None:
        with self._lock:
            self._levels.clear()
            self._slots.clear()


class _Plan:
    """What one request asks of the limiter: its buckets, the concurrency slot, and the script's arguments."""

    __slots__ = ("buckets", "cap", "concurrency_key", "slot", "slot_ttl_ms", "keys", "args")

    def __init__(self, api_key, organization, tokens: int, slot: str | None = None) -> None:
        self.buckets = buckets_for(api_key, organization, tokens)
        self.cap = organization.max_concurrent_requests or 0
        self.concurrency_key = f"rl:org:{organization.pk}:slots" if self.cap else None
        # A slot lives as long as a quota hold: the request extends both while it runs.
        self.slot, self.slot_ttl_ms = slot or uuid.uuid4().hex, settings.GATEWAY_RESERVATION_TTL_SECONDS * 1000
        self.keys = [b.key for b in self.buckets] + ([self.concurrency_key] if self.concurrency_key else [])
        self.args = [x for b in self.buckets for x in (b.capacity, b.cost)] + [self.cap, self.slot, self.slot_ttl_ms]
        too_large = next((b for b in self.buckets if b.cost > b.capacity), None)
        if too_large is not None:
            raise request_too_large(too_large, "key" if too_large.key.startswith("rl:key:") else "organization")

    @property
    def empty(self) -> bool:
        return not self.buckets and not self.concurrency_key

    def charged(self, decision: Decision) -> Decision:
        """The decision, remembering (when allowed) which token buckets it charged and how much."""
        if decision.allowed:
            decision.concurrency_slot = self.slot
            decision.token_buckets = tuple((b.key, b.capacity) for b in self.buckets if b.kind == "tokens")
            decision.token_cost = next((b.cost for b in self.buckets if b.kind == "tokens"), 0)
        return decision


class RateLimiter:
    """Front door: Redis when configured (one script call per request), local buckets otherwise.

    Synchronous: it runs in the same worker-thread hop as the key lookup and the quota reservation.
    """

    def __init__(self, redis_url: str, on_redis_error: str, timeout: float) -> None:
        if on_redis_error not in ("refuse", "local"):
            raise ValueError("GATEWAY_RATELIMIT_ON_REDIS_ERROR must be 'refuse' or 'local'.")
        self.redis_url = redis_url
        self.on_redis_error = on_redis_error
        self.local = LocalLimiter()
        self.timeout = timeout
        self._async = None  # (event loop, its scripts) of this process's loop
        self.redis = None
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
            self.script = self.redis.register_script(LUA_ACQUIRE)
            self.release_script = self.redis.register_script(LUA_RELEASE)
            self.extend_script = self.redis.register_script(LUA_EXTEND)

    def acquire(self, api_key, organization, tokens: int, slot: str | None = None) -> Decision:
        """Check and charge every limit that applies; `slot` names the request's concurrency slot."""
        plan = _Plan(api_key, organization, tokens, slot)
        if plan.empty:
            return Decision(True)
        if self.redis is not None:
            try:
                return plan.charged(decide(plan.buckets, self.script(keys=plan.keys, args=plan.args),
                                           plan.concurrency_key))
            except Exception as exc:  # redis.ConnectionError, TimeoutError, ...
                self._redis_failed(exc)
        return self._acquire_locally(plan)

    async def acquire_async(self, api_key, organization, tokens: int, slot: str | None = None) -> Decision:
        """`acquire` on the event loop: the same script through the asyncio Redis client."""
        plan = _Plan(api_key, organization, tokens, slot)
        if plan.empty:
            return Decision(True)
        if self.redis is not None:
            try:
                answer = await self._async_scripts()[0](keys=plan.keys, args=plan.args)
                return plan.charged(decide(plan.buckets, answer, plan.concurrency_key))
            except Exception as exc:
                self._redis_failed(exc)
        return self._acquire_locally(plan)

    def _redis_failed(self, exc: Exception) -> None:
        """Apply GATEWAY_RATELIMIT_ON_REDIS_ERROR: refuse (503), or return to fall back to local buckets."""
        if self.on_redis_error == "refuse":
            logger.warning("rate limiter: Redis unreachable, refusing: %s", exc)
            raise service_unavailable("The rate limiter is temporarily unavailable; retry shortly.") from exc
        logger.warning("rate limiter: Redis unreachable, using per-process limits: %s", exc)

    def _acquire_locally(self, plan: _Plan) -> Decision:
        answer = self.local.acquire(plan.buckets, plan.concurrency_key, plan.cap, plan.slot, plan.slot_ttl_ms)
        decision = plan.charged(decide(plan.buckets, answer, plan.concurrency_key))
        decision.local = True
        return decision

    async def release_async(self, decision: Decision, used_tokens: int | None = None) -> None:
        """`release` on the event loop."""
        work = self._release_work(decision, used_tokens)
        if work is None:
            return
        if self.redis is not None and not decision.local:
            try:
                await self._async_scripts()[1](keys=work[0], args=work[1])
            except Exception as exc:  # the slot expires on its own (the hold's TTL)
                logger.warning("rate limiter: could not release %s in Redis: %s", work[0], exc)
            return
        self.local.release(*work[2])

    def _async_scripts(self):
        """(acquire, release, extend) scripts on this process's asyncio Redis client for the running loop."""
        import asyncio

        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._async is None or self._async[0] is not loop:
            client = aioredis.Redis.from_url(self.redis_url, socket_timeout=self.timeout, socket_connect_timeout=self.timeout)
            self._async = (loop, tuple(client.register_script(lua) for lua in (LUA_ACQUIRE, LUA_RELEASE, LUA_EXTEND)))
        return self._async[1]

    def release(self, decision: Decision, used_tokens: int | None = None) -> None:
        """Give back the concurrency slot `acquire` took and refund the tokens-per-minute buckets what the
        request did not use of its hold (`used_tokens`; None: it used nothing). Once per decision."""
        work = self._release_work(decision, used_tokens)
        if work is None:
            return
        if self.redis is not None and not decision.local:
            try:
                self.release_script(keys=work[0], args=work[1])
            except Exception as exc:  # the slot expires on its own (the hold's TTL)
                logger.warning("rate limiter: could not release %s in Redis: %s", work[0], exc)
            return
        self.local.release(*work[2])

    def extend(self, decision: Decision) -> None:
        """Push the request's concurrency slot expiry a full TTL ahead (the request is still running)."""
        if decision.concurrency_key is None:
            return
        ttl_ms = settings.GATEWAY_RESERVATION_TTL_SECONDS * 1000
        if self.redis is not None and not decision.local:
            self.extend_script(keys=[decision.concurrency_key], args=[decision.concurrency_slot, ttl_ms])
        else:
            self.local.extend(decision.concurrency_key, decision.concurrency_slot, ttl_ms)

    async def extend_async(self, decision: Decision) -> None:
        if decision.concurrency_key is None:
            return
        ttl_ms = settings.GATEWAY_RESERVATION_TTL_SECONDS * 1000
        if self.redis is not None and not decision.local:
            await self._async_scripts()[2](keys=[decision.concurrency_key], args=[decision.concurrency_slot, ttl_ms])
        else:
            self.local.extend(decision.concurrency_key, decision.concurrency_slot, ttl_ms)

    @staticmethod
    def _release_work(decision: Decision, used_tokens: int | None):
        """(script keys, script args, local-release args) for a release, or None when there is nothing to
        give back; marks the decision released."""
        refund = decision.token_cost - (used_tokens or 0)
        buckets = decision.token_buckets if refund > 0 else ()
        key = decision.concurrency_key
        decision.concurrency_key, decision.token_buckets = None, ()
        if key is None and not buckets:
            return None
        keys = [k for k, _ in buckets] + ([key] if key else [])
        slot = decision.concurrency_slot if key else ""
        args = [refund, *(capacity for _, capacity in buckets), slot]
        return keys, args, (key, slot, buckets, refund)


def rate_limit_error(decision: Decision) -> GatewayError:
    seconds = max(1, math.ceil(decision.retry_after_ms / 1000))
    headers = dict(decision.headers)
    headers["retry-after"] = str(seconds)
    headers["retry-after-ms"] = str(max(decision.retry_after_ms, 1))
    if decision.denied_kind == "concurrency":
        message = "Too many concurrent requests for your organization. Retry when one finishes."
    else:
        message = (
            f"Rate limit reached for {decision.denied_kind} per minute. "
            f"Please try again in {format_duration(decision.retry_after_ms / 1000)}."
        )
    return GatewayError(429, message, decision.denied_kind or "requests", "rate_limit_exceeded", headers=headers)


def request_too_large(bucket: Bucket, scope: str) -> GatewayError:
    """A request whose hold exceeds a tokens-per-minute limit can never pass: OpenAI's wording, no retry."""
    return GatewayError(
        429,
        f"Request too large for this {scope} on tokens per min (TPM): Limit {bucket.capacity}, Requested "
        f"{bucket.cost}. The input or output tokens must be reduced in order to run successfully.",
        "tokens", "rate_limit_exceeded", headers={"x-should-retry": "false"},
    )


_limiter: RateLimiter | None = None


def get_limiter() -> RateLimiter:
    global _limiter
    if _limiter is None:
        _limiter = RateLimiter(
            settings.REDIS_URL if settings.GATEWAY_RATELIMIT_USE_REDIS else "",
            settings.GATEWAY_RATELIMIT_ON_REDIS_ERROR,
            settings.GATEWAY_REDIS_TIMEOUT,
        )
    return _limiter


def reset_limiter() -> None:
    """Forget the limiter (settings changed, e.g. in tests)."""
    global _limiter
    _limiter = None
