"""Which replica answers a request, decided with state every gateway process shares in Redis.

- Load: each replica's requests in flight from every gateway (a sorted set of request ids per replica,
  scored by expiry, so a crashed gateway's requests age out), or what the engine itself reports at
  GET /load (running + waiting; one gateway process polls each GATEWAY_LOAD_POLL_SECONDS), whichever
  is higher.
- "affinity": requests sharing a prompt prefix go to the replica that holds that prefix in its cache:
  consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, 2018) on rendezvous order
  (highest random weight, weighted), applied as the paper does to keys: a new key gets a home, the first
  replica in its order holding fewer than GATEWAY_AFFINITY_KEY_FACTOR times the mean number of keys
  (those used in the last GATEWAY_AFFINITY_HOLDER_SECONDS), so tenants' prefixes spread evenly and each
  stays on one replica (a home is kept, so a tight factor costs no cache hits); and to requests: a home whose requests in flight exceed the factor times the mean
  lends this one to the first replica in the key's order under it (which then caches the prefix too).
  The key is the tenant's cache_salt and the first GATEWAY_AFFINITY_PREFIX_CHARS of the prompt, so two
  tenants never share a key.
- "least_loaded": fewest per unit of weight; "round_robin": a shared counter per model.

The choice and the slot it takes are one Redis script call (atomic across gateways). When Redis cannot
be reached, the per-process choice of catalog.pick applies.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time

import httpx
from django.conf import settings
from opentelemetry import context as otel_context

from .catalog import CatalogEntry, Upstream, catalog
from .proxy import http_client, upstream_headers
from .validation import InferenceRequest

logger = logging.getLogger(__name__)

PREFIX = "maas:{route}:"  # one hash slot: the script touches several keys

# KEYS: in-flight sets of the n candidates (in preference order), their engine-reported loads, the
# round-robin counter, the key's home (a deployment id), then the candidates' key sets (key -> last use).
# ARGV: n, mode, load factor, slot, ttl ms, home ttl ms, the n weights, the n deployment ids, the key, the
# key factor.
# Returns the chosen candidate's 1-based index and every candidate's load before the choice.
LUA_CHOOSE = """
local n = tonumber(ARGV[1])
local mode, factor, slot, ttl, held_ttl = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local loads, total, wsum = {}, 0, 0
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local mine = redis.call('ZCARD', KEYS[i])
  local reported = tonumber(redis.call('GET', KEYS[n + i]) or '0') or 0
  loads[i] = math.max(mine, reported)
  total = total + loads[i]
  wsum = wsum + tonumber(ARGV[6 + i])
end
local chosen = nil
if mode == 'round_robin' then
  chosen = (redis.call('INCR', KEYS[2 * n + 1]) - 1) % n + 1
elseif mode == 'affinity' then
  local function fits(i, load, sum, f)
    return load + 1 <= math.ceil((f or factor) * (sum + 1) * tonumber(ARGV[6 + i]) / wsum)
  end
  local home = redis.call('GET', KEYS[2 * n + 2])
  local at = nil
  for i = 1, n do if ARGV[6 + n + i] == home then at = i end end
  if at ~= nil and fits(at, loads[at], total) then
    chosen = at
  elseif at == nil then  -- a new key (or its home is gone): the first replica with room for one more key
    local keys, ktotal = {}, 0
    for i = 1, n do
      redis.call('ZREMRANGEBYSCORE', KEYS[2 * n + 2 + i], '-inf', now - held_ttl)
      keys[i] = redis.call('ZCARD', KEYS[2 * n + 2 + i])
      ktotal = ktotal + keys[i]
    end
    for i = 1, n do
      if fits(i, keys[i], ktotal, tonumber(ARGV[8 + 2 * n])) and fits(i, loads[i], total) then
        chosen = i; at = i; break
      end
    end
  else  -- its home is full: lent to the first replica in the key's order with room
    for i = 1, n do
      if fits(i, loads[i], total) then chosen = i; break end
    end
  end
  if at ~= nil then
    redis.call('SET', KEYS[2 * n + 2], ARGV[6 + n + at], 'PX', held_ttl)
    redis.call('ZADD', KEYS[2 * n + 2 + at], now, ARGV[7 + 2 * n])
    redis.call('PEXPIRE', KEYS[2 * n + 2 + at], held_ttl)
  end
end
if chosen == nil then
  local best = nil
  for i = 1, n do
    local per = loads[i] / tonumber(ARGV[6 + i])
    if best == nil or per < best then best = per; chosen = i end
  end
end
redis.call('ZADD', KEYS[chosen], now + ttl, slot)
redis.call('PEXPIRE', KEYS[chosen], ttl)
return {chosen, unpack(loads)}
"""

# KEYS[1]: the in-flight set; ARGV: slot, ttl ms (0: remove). Extends only a slot still there.
LUA_SLOT = """
if tonumber(ARGV[2]) == 0 then return redis.call('ZREM', KEYS[1], ARGV[1]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""


def inflight_key(deployment_id: int) -> str:
    return f"{PREFIX}inflight:{deployment_id}"


def load_key(deployment_id: int) -> str:
    return f"{PREFIX}load:{deployment_id}"


def load_info_key(deployment_id: int) -> str:
    return f"{PREFIX}loadinfo:{deployment_id}"


def affinity_key(inference: InferenceRequest, cache_salt: str) -> str | None:
    """The tenant's salt and the start of the prompt as the engine will cache it (tools render before the
    messages); None for embeddings, which nothing caches."""
    body = inference.body
    if inference.endpoint == "chat/completions":
        head = json.dumps([body.get("tools") or [], [[m.get("role"), m.get("content")] for m in body["messages"]]],
                          ensure_ascii=False, separators=(",", ":"))
    elif inference.endpoint == "completions":
        prompt = body.get("prompt")
        head = prompt if isinstance(prompt, str) else json.dumps(prompt, separators=(",", ":"))
    else:
        return None
    prefix = head[: settings.GATEWAY_AFFINITY_PREFIX_CHARS]
    return hashlib.sha256(f"{cache_salt}\0{prefix}".encode()).hexdigest()


def candidate_entries(caller, entry: CatalogEntry, endpoint: str) -> list[CatalogEntry]:
    """The requested model, then its fallback models in order: those `caller` (quotas.Caller) may use and
    that serve the endpoint (one level: a fallback's own fallbacks are not followed)."""
    from .errors import GatewayError

    found = [entry]
    for name in entry.fallbacks:
        try:
            fallback, _ = caller.resolve(name)
        except GatewayError:
            continue
        if fallback.model.endpoint_refusal(endpoint) is None and fallback not in found:
            found.append(fallback)
    return found


def first_available(caller, entry: CatalogEntry, endpoint: str) -> Upstream | None:
    """A replica of the model or of a fallback that can take the request now (admission's 503 check; the
    router chooses when forwarding)."""
    for candidate in candidate_entries(caller, entry, endpoint):
        upstream = catalog.pick(candidate)
        if upstream is not None:
            return upstream
    return None


def rendezvous_order(key: str, upstreams: list[Upstream]) -> list[Upstream]:
    """Weighted highest-random-weight order: each key's own permutation of the replicas, stable when one
    is added or removed (only the keys it ranked first move), a replica of weight w first w/W of the time."""
    def score(u: Upstream) -> float:
        digest = hashlib.sha256(f"{key}:{u.id}".encode()).digest()
        h = (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 2)  # in (0, 1)
        return max(u.weight, 1) / -math.log(h)

    return sorted(upstreams, key=score, reverse=True)


class Router:
    def __init__(self, redis_url: str, timeout: float) -> None:
        self.redis_url = redis_url
        self.timeout = timeout
        self._loop_state = None  # (event loop, client, choose script, slot script)
        self._polled_at = float("-inf")
        self._slots: set[tuple[int, str]] = set()  # (deployment, request) slots this process took in Redis

    def _scripts(self):
        import redis.asyncio as aioredis

        loop = asyncio.get_running_loop()
        if self._loop_state is None or self._loop_state[0] is not loop:
            client = aioredis.Redis.from_url(self.redis_url, socket_timeout=self.timeout,
                                             socket_connect_timeout=self.timeout)
            self._loop_state = (loop, client, client.register_script(LUA_CHOOSE), client.register_script(LUA_SLOT))
        return self._loop_state[1:]

    async def choose(self, entry: CatalogEntry, key: str | None, slot: str,
                     exclude: frozenset[int] = frozenset()) -> Upstream | None:
        """The replica for this request, its slot taken; None when no replica is available. Without Redis:
        this process's least loaded (catalog.pick)."""
        candidates = catalog.available(entry, exclude)
        if not candidates:
            return None
        mode = settings.GATEWAY_ROUTING
        if mode == "affinity" and key is not None:
            candidates = rendezvous_order(key, candidates)
        else:
            if mode == "affinity":
                mode = "least_loaded"
            candidates.sort(key=lambda u: (-u.weight, u.id))
        if not self.redis_url:
            return catalog.pick(entry, exclude)
        if len(candidates) == 1 and not exclude:
            return candidates[0]  # nothing to choose: no Redis round trip (and no slot to release)
        self.maybe_poll()
        try:
            _, choose, _ = self._scripts()
            keys = ([inflight_key(u.id) for u in candidates] + [load_key(u.id) for u in candidates]
                    + [f"{PREFIX}rr:{entry.model.pk}", f"{PREFIX}home:{key}"]
                    + [f"{PREFIX}keys:{u.id}" for u in candidates])
            args = [len(candidates), mode, settings.GATEWAY_AFFINITY_LOAD_FACTOR, slot, self.slot_ttl_ms(),
                    int(settings.GATEWAY_AFFINITY_HOLDER_SECONDS * 1000),
                    *(max(u.weight, 1) for u in candidates), *(u.id for u in candidates), key or "",
                    settings.GATEWAY_AFFINITY_KEY_FACTOR]
            answer = await choose(keys=keys, args=args)
        except Exception as exc:  # noqa: BLE001 - redis.ConnectionError, TimeoutError, ...
            logger.warning("routing: Redis unreachable, choosing in this process: %s", exc)
            return catalog.pick(entry, exclude)
        chosen = candidates[int(answer[0]) - 1]
        self._slots.add((chosen.id, slot))
        return chosen

    @staticmethod
    def slot_ttl_ms() -> int:
        return settings.GATEWAY_RESERVATION_TTL_SECONDS * 1000

    async def release(self, upstream: Upstream, slot: str) -> None:
        if (upstream.id, slot) in self._slots:
            self._slots.discard((upstream.id, slot))
            await self._slot(upstream, slot, 0)

    async def extend(self, upstream: Upstream, slot: str) -> None:
        if (upstream.id, slot) in self._slots:
            await self._slot(upstream, slot, self.slot_ttl_ms())

    async def _slot(self, upstream: Upstream, slot: str, ttl_ms: int) -> None:
        try:
            await self._scripts()[2](keys=[inflight_key(upstream.id)], args=[slot, ttl_ms])
        except Exception as exc:  # noqa: BLE001 - the slot ages out on its own
            logger.warning("routing: could not update slot %s of deployment %s: %s", slot, upstream.id, exc)

    def maybe_poll(self) -> None:
        """Start a poll of the engines' /load when this process has not started one for a poll period;
        the Redis lock makes it one poll per period across all gateway processes."""
        now = time.monotonic()
        if now - self._polled_at < settings.GATEWAY_LOAD_POLL_SECONDS:
            return
        self._polled_at = now
        detached = otel_context.attach(otel_context.Context())  # the poll is not the request's work
        try:
            task = asyncio.ensure_future(self.poll())
        finally:
            otel_context.detach(detached)
        _polls.add(task)
        task.add_done_callback(_polls.discard)

    async def poll(self) -> None:
        client = self._scripts()[0]
        period_ms = max(int(settings.GATEWAY_LOAD_POLL_SECONDS * 1000), 100)
        try:
            if not await client.set(f"{PREFIX}poll-lock", "1", nx=True, px=period_ms):
                return  # another gateway process polls this period
            entries = catalog.cached_entries() or {}
            engines = {u.id: u for e in entries.values() for u in e.upstreams if u.is_engine and u.healthy}

            async def one(u: Upstream):
                try:
                    response = await http_client().get(f"{u.base_url}/load", headers=upstream_headers(u, "load"),
                                                       timeout=1.0)
                    return u.id, response.json() if response.status_code == 200 else None
                except (httpx.HTTPError, ValueError):
                    return u.id, None

            results = await asyncio.gather(*(one(u) for u in engines.values()))
            pipe = client.pipeline(transaction=False)
            for deployment_id, load in results:
                if isinstance(load, dict):
                    queued = int(load.get("running", 0)) + int(load.get("waiting", 0))
                    pipe.set(load_key(deployment_id), queued, px=3 * period_ms)
                    pipe.set(load_info_key(deployment_id), json.dumps(load), px=10 * period_ms)
            await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - the next period polls again
            logger.warning("routing: load poll failed: %s", exc)


_polls: set[asyncio.Task] = set()
_router: Router | None = None


def get_router() -> Router:
    global _router
    if _router is None:
        _router = Router(settings.REDIS_URL, settings.GATEWAY_REDIS_TIMEOUT)
    return _router


def reset_router() -> None:
    """Forget the router (settings changed, e.g. in tests)."""
    global _router
    _router = None
