"""The rate limiter: token buckets in Redis (real server, the gateway test database 6) and in process,
OpenAI's header formats, the concurrency cap, and both policies when Redis is unreachable."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from inference.errors import GatewayError
from inference.ratelimit import LocalLimiter, RateLimiter, format_duration, rate_limit_error

from .conftest import REDIS_URL, free_port


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.02, "20ms"), (0.9994, "1s"), (1, "1s"), (1.5, "1.5s"), (59.25, "59.25s"), (60, "1m0s"),
    (90.5, "1m30.5s"), (360, "6m0s"), (3600, "1h0m0s"), (3725, "1h2m5s"),
])
def test_reset_durations_are_go_style_like_openai(seconds, text):
    assert format_duration(seconds) == text


_ids = iter(range(10**6, 10**7))


def owner(rpm=None, tpm=None, concurrent=None):
    return SimpleNamespace(pk=next(_ids), requests_per_minute=rpm, tokens_per_minute=tpm, max_concurrent_requests=concurrent)


@pytest.fixture(params=["redis", "local"])
def limiter(request, redis_clean):
    return RateLimiter(REDIS_URL if request.param == "redis" else "", "refuse", 0.5)


def test_requests_per_minute_with_headers(limiter):
    key, org = owner(rpm=3), owner()
    decisions = [limiter.acquire(key, org, 10) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.headers["x-ratelimit-remaining-requests"] for d in decisions] == ["2", "1", "0", "0"]
    assert decisions[0].headers["x-ratelimit-limit-requests"] == "3"
    assert decisions[0].headers["x-ratelimit-reset-requests"] == "20s"  # one request refills in 60/3 s
    denied = decisions[-1]
    assert denied.denied_kind == "requests" and 19_000 < denied.retry_after_ms <= 20_000
    error = rate_limit_error(denied)
    assert (error.status, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert error.headers["retry-after"] == "20" and "x-should-retry" not in error.headers


def test_tokens_per_minute_and_tightest_bucket_reported(limiter):
    key, org = owner(tpm=1000), owner(tpm=500)
    first = limiter.acquire(key, org, 300)
    assert first.allowed
    assert first.headers["x-ratelimit-limit-tokens"] == "500"  # the organization's bucket is tighter
    assert first.headers["x-ratelimit-remaining-tokens"] == "200"
    assert first.headers["x-ratelimit-reset-tokens"] == "36s"
    second = limiter.acquire(key, org, 300)
    assert not second.allowed and second.denied_kind == "tokens"
    # A refusal consumes nothing: a smaller request still fits.
    assert limiter.acquire(key, org, 200).allowed


def test_no_limits_and_no_platform_default_means_no_headers(limiter, settings):
    settings.GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE = 0
    settings.GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE = 0
    decision = limiter.acquire(owner(), owner(), 10**9)
    assert decision.allowed and decision.headers == {}


def test_organization_without_limits_gets_the_platform_default(limiter, settings):
    settings.GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE = 2
    settings.GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE = 1000
    key, org = owner(), owner()
    first = limiter.acquire(key, org, 100)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-tokens"] == "900"
    assert limiter.acquire(key, org, 100).allowed
    assert limiter.acquire(key, org, 100).denied_kind == "requests"
    # An organization's own limit wins over the default.
    assert limiter.acquire(key, owner(rpm=5), 100).headers["x-ratelimit-limit-requests"] == "5"


def test_organization_concurrency_cap(limiter):
    key, org = owner(), owner(concurrent=2)
    held = [limiter.acquire(key, org, 1) for _ in range(2)]
    assert all(d.allowed for d in held)
    refused = limiter.acquire(key, org, 1)
    assert not refused.allowed and refused.denied_kind == "concurrency"
    limiter.release(held[0])
    limiter.release(held[0])  # releasing twice gives back one slot only
    assert limiter.acquire(key, org, 1).allowed
    assert not limiter.acquire(key, org, 1).allowed


def test_redis_buckets_are_atomic_across_threads(redis_clean):
    limiters = [RateLimiter(REDIS_URL, "refuse", 2.0) for _ in range(4)]  # as if four processes
    key, org = owner(rpm=25), owner()
    allowed = []

    def hammer(limiter):
        for _ in range(20):
            allowed.append(limiter.acquire(key, org, 1).allowed)

    threads = [threading.Thread(target=hammer, args=(limiters[i % 4],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 160 and sum(allowed) == 25


def test_unreachable_redis_refuses_with_503(caplog):
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", "refuse", 0.2)
    with pytest.raises(GatewayError) as err:
        limiter.acquire(owner(rpm=5), owner(), 1)
    assert err.value.status == 503 and err.value.type == "server_error"
    assert err.value.message == "The rate limiter is temporarily unavailable; retry shortly."
    warned = caplog.records[-1].getMessage()  # the warning names the policy and Redis's own error
    assert warned.startswith("rate limiter: Redis unreachable, refusing: Error ") and "refused" in warned


def test_unreachable_redis_falls_back_to_local_buckets(caplog):
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", "local", 0.2)
    key, org = owner(rpm=3), owner(concurrent=1)
    decisions = [limiter.acquire(key, org, 1) for _ in range(2)]
    assert [d.allowed for d in decisions] == [True, False] and decisions[1].denied_kind == "concurrency"
    assert all(d.local for d in decisions)
    limiter.extend(decisions[0])  # locally too: there is no Redis to reach
    limiter.release(decisions[0])  # the local slot comes back
    again = limiter.acquire(key, org, 1)
    assert again.allowed and again.local and not limiter.acquire(key, org, 1).allowed  # its slot taken again
    warned = caplog.records[-1].getMessage()
    assert warned.startswith("rate limiter: Redis unreachable, using per-process limits: Error ") and "refused" in warned
    limiter.release(decisions[0])


def test_when_several_buckets_refuse_the_longest_wait_is_reported(limiter):
    key = owner(rpm=1, tpm=100)
    assert limiter.acquire(key, owner(), 100).allowed
    refused = limiter.acquire(key, owner(), 50)  # requests: 60 s for the next one; tokens: 30 s for 50
    assert refused.denied_kind == "requests" and 59_000 < refused.retry_after_ms <= 60_000


def test_a_refund_never_lifts_a_local_bucket_above_its_capacity(monkeypatch):
    import inference.ratelimit as rl

    clock = [1000.0]
    monkeypatch.setattr(rl.time, "monotonic", lambda: clock[0])
    limiter = RateLimiter("", "refuse", 0.5)
    key, org = owner(tpm=1000), owner()
    hold = limiter.acquire(key, org, 800)
    clock[0] += 60  # a minute later the bucket is full again
    assert limiter.acquire(key, org, 0).headers["x-ratelimit-remaining-tokens"] == "1000"
    limiter.release(hold)  # 800 unused: the bucket stays at its 1000
    assert limiter.acquire(key, org, 1000).allowed and not limiter.acquire(key, org, 1).allowed


def test_policy_must_be_known():
    with pytest.raises(ValueError, match="refuse"):
        RateLimiter("", "ignore", 1)


def test_local_limiter_refills_over_time(monkeypatch):
    import inference.ratelimit as rl

    clock = [1000.0]
    monkeypatch.setattr(rl.time, "monotonic", lambda: clock[0])
    local = LocalLimiter()
    bucket = rl.Bucket("k", "requests", 60, 1)
    assert [local.acquire([bucket], None, 0)[0] for _ in range(61)].count(1) == 60
    clock[0] += 1.0  # one request per second comes back
    assert local.acquire([bucket], None, 0)[0] == 1
    assert local.acquire([bucket], None, 0)[0] == 0


def test_a_crashed_requests_concurrency_slot_comes_back_under_steady_traffic(limiter, settings):
    """A request that took a slot and never released it (its worker died) holds it only for the hold's
    TTL, even while other requests keep arriving; a live request extends its slot meanwhile."""
    import time

    settings.GATEWAY_RESERVATION_TTL_SECONDS = 1
    org = owner(concurrent=2)
    crashed = limiter.acquire(None, org, 1, "crashed")
    live = limiter.acquire(None, org, 1, "live")
    assert crashed.allowed and live.allowed
    deadline = time.monotonic() + 1.6
    refused = 0
    while time.monotonic() < deadline:  # steady traffic, refused while both slots are taken
        limiter.extend(live)
        decision = limiter.acquire(None, org, 1)
        if decision.allowed:
            break
        assert decision.denied_kind == "concurrency"
        refused += 1
        time.sleep(0.1)
    assert refused >= 5 and decision.allowed  # the crashed slot expired; the live one did not
    assert not limiter.acquire(None, org, 1).allowed  # live + the newcomer: full again
    limiter.release(live)
    assert limiter.acquire(None, org, 1).allowed


def test_the_unused_tokens_of_a_hold_are_refunded_on_release(limiter):
    key, org = owner(tpm=1000), owner()
    first = limiter.acquire(key, org, 800)
    assert first.allowed and not limiter.acquire(key, org, 800).allowed
    limiter.release(first, used_tokens=100)  # 700 unused come back, not the 100 used
    assert limiter.acquire(key, org, 800).allowed
    assert not limiter.acquire(key, org, 150).allowed  # about 100 left (and what refilled meanwhile)


def test_a_hold_over_a_tokens_per_minute_limit_is_too_large(limiter):
    with pytest.raises(GatewayError) as refused:
        limiter.acquire(owner(tpm=100), owner(), 150)
    error = refused.value
    assert (error.status, error.type, error.code) == (429, "tokens", "rate_limit_exceeded")
    assert "Limit 100, Requested 150" in error.message and error.headers["x-should-retry"] == "false"


async def test_on_the_event_loop_a_hold_is_charged_extended_refunded_and_released(limiter, settings):
    """The asyncio paths (the gateway's): the same buckets, concurrency slot and refund as the sync ones."""
    import asyncio

    key, org = owner(tpm=1000), owner(concurrent=1)
    settings.GATEWAY_RESERVATION_TTL_SECONDS = 1
    first = await limiter.acquire_async(key, org, 800)
    assert first.allowed and first.headers["x-ratelimit-remaining-tokens"] == "200"
    refused = await limiter.acquire_async(key, org, 100)
    assert not refused.allowed and refused.denied_kind == "concurrency"
    settings.GATEWAY_RESERVATION_TTL_SECONDS = 600
    await limiter.extend_async(first)  # the slot now outlives its first second
    await asyncio.sleep(1.1)
    assert (await limiter.acquire_async(key, org, 100)).denied_kind == "concurrency"
    await limiter.release_async(first, used_tokens=100)  # the slot back, and the 700 unused tokens
    second = await limiter.acquire_async(key, org, 800)
    # 200 left + 700 refunded - 800, plus what refilled meanwhile (1000 a minute: under 20 a second)
    assert second.allowed and 100 <= int(second.headers["x-ratelimit-remaining-tokens"]) < 160
    await limiter.release_async(second)  # it used nothing: all 800 back
    await limiter.release_async(second)  # once per decision
    assert (await limiter.acquire_async(key, org, 900)).allowed
    settings.GATEWAY_DEFAULT_ORG_REQUESTS_PER_MINUTE = settings.GATEWAY_DEFAULT_ORG_TOKENS_PER_MINUTE = 0
    unlimited = await limiter.acquire_async(None, owner(), 10**9)  # no limit applies: nothing to ask Redis
    assert unlimited.allowed and unlimited.headers == {} and unlimited.concurrency_key is None


@pytest.mark.parametrize("policy", ["refuse", "local"])
async def test_on_the_event_loop_an_unreachable_redis_follows_the_policy(policy):
    limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", policy, 0.2)
    key, org = owner(rpm=1), owner(concurrent=3)
    if policy == "refuse":
        with pytest.raises(GatewayError) as err:
            await limiter.acquire_async(key, org, 1)
        assert err.value.status == 503
        return
    first = await limiter.acquire_async(key, org, 1)
    assert first.allowed and first.local and not (await limiter.acquire_async(key, org, 1)).allowed
    key, org = owner(rpm=5), owner(concurrent=1)
    held = await limiter.acquire_async(key, org, 1)
    assert (await limiter.acquire_async(key, org, 1)).denied_kind == "concurrency"
    await limiter.extend_async(held)
    await limiter.release_async(held)  # locally: no Redis to reach
    assert (await limiter.acquire_async(key, org, 1)).allowed


def test_a_release_redis_cannot_take_is_logged_not_raised(redis_clean, caplog):
    """Redis goes away between acquire and release (the release script is re-pointed at a closed port):
    the request's answer must not fail for it; the slot expires on its own."""
    limiter = RateLimiter(REDIS_URL, "refuse", 0.5)
    decision = limiter.acquire(owner(tpm=100), owner(concurrent=2), 50)
    keys = [k for k, _ in decision.token_buckets] + [decision.concurrency_key]
    limiter.release_script = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", "refuse", 0.2).redis.register_script("return 1")
    limiter.release(decision, used_tokens=10)
    warned = caplog.records[-1].getMessage()
    assert warned.startswith(f"rate limiter: could not release {keys} in Redis: Error ") and "refused" in warned
    assert decision.concurrency_key is None  # released once, even so


def test_key_and_organization_limits_are_separate_buckets(limiter):
    org = owner(rpm=3)
    one, two = owner(rpm=1), owner(rpm=1)
    assert limiter.acquire(one, org, 1).allowed
    assert limiter.acquire(one, org, 1).denied_kind == "requests"  # the key's bucket, not the org's
    assert limiter.acquire(two, org, 1).allowed
    assert limiter.acquire(None, org, 1).allowed  # the playground: the organization's limit only
    last = limiter.acquire(owner(), org, 1)
    assert not last.allowed and last.headers["x-ratelimit-limit-requests"] == "3"


def test_an_organizations_tokens_limit_too_small_for_the_hold_names_the_organization(limiter):
    with pytest.raises(GatewayError) as refused:
        limiter.acquire(owner(tpm=1000), owner(tpm=100), 150)
    assert "for this organization on tokens per min (TPM): Limit 100, Requested 150" in refused.value.message
    with pytest.raises(GatewayError) as refused:
        limiter.acquire(owner(tpm=100), owner(tpm=1000), 150)
    assert "for this key on tokens per min" in refused.value.message


@pytest.mark.parametrize(("kind", "wait_ms", "retry_after", "retry_after_ms", "says"), [
    ("concurrency", 1000, "1", "1000", "Too many concurrent requests for your organization. Retry when one finishes."),
    ("tokens", 1500, "2", "1500", "Rate limit reached for tokens per minute. Please try again in 1.5s."),
    ("requests", 0, "1", "1", "Rate limit reached for requests per minute. Please try again in 0s."),
    ("requests", 2001, "3", "2001", "Rate limit reached for requests per minute. Please try again in 2.001s."),
])
def test_a_refusal_says_why_and_when_to_retry(kind, wait_ms, retry_after, retry_after_ms, says):
    from inference.ratelimit import Decision

    error = rate_limit_error(Decision(False, wait_ms, kind, {"x-ratelimit-limit-requests": "5"}))
    assert (error.status, error.type, error.code, error.message) == (429, kind, "rate_limit_exceeded", says)
    assert error.headers == {"x-ratelimit-limit-requests": "5", "retry-after": retry_after, "retry-after-ms": retry_after_ms}


def test_the_gateways_limiter_is_one_per_process_until_reset(settings):
    from inference.ratelimit import get_limiter, reset_limiter

    reset_limiter()
    settings.GATEWAY_RATELIMIT_USE_REDIS = False
    local = get_limiter()
    assert local is get_limiter() and local.redis is None
    reset_limiter()
    settings.GATEWAY_RATELIMIT_USE_REDIS, settings.REDIS_URL = True, REDIS_URL
    settings.GATEWAY_RATELIMIT_ON_REDIS_ERROR, settings.GATEWAY_REDIS_TIMEOUT = "local", 0.3
    shared = get_limiter()
    assert shared is not local and shared.redis is not None
    assert (shared.redis_url, shared.on_redis_error, shared.timeout) == (REDIS_URL, "local", 0.3)
    reset_limiter()


async def test_each_event_loop_gets_its_own_redis_client_and_keeps_it(redis_clean):
    """redis.asyncio clients belong to the loop that made them: one per loop, reused within it."""
    import asyncio

    limiter = RateLimiter(REDIS_URL, "refuse", 0.5)

    async def scripts():
        return limiter._async_scripts()

    mine = await scripts()
    assert await scripts() is mine
    other = await asyncio.to_thread(asyncio.run, scripts())  # another thread's loop
    assert other is not mine and await scripts() is not mine  # back here: this loop's own again


def test_a_local_slot_lives_a_ttl_past_its_last_extension(monkeypatch):
    import inference.ratelimit as rl

    clock = [1000.0]
    monkeypatch.setattr(rl.time, "monotonic", lambda: clock[0])
    local = LocalLimiter()
    assert local.acquire([], "slots", 1, "live", 1000)[0] == 1
    clock[0] += 0.5
    local.extend("slots", "live", 1000)  # now it expires at 1.5 s
    local.extend("unknown", "live", 1000)  # a key this process never saw (reset meanwhile): nothing to do
    clock[0] += 0.9
    assert local.acquire([], "slots", 1, "next", 1000)[0] == 0
    clock[0] += 0.2
    assert local.acquire([], "slots", 1, "next", 1000)[0] == 1


@pytest.mark.parametrize("on_the_loop", [False, True])
async def test_a_redis_that_never_answers_counts_as_unreachable_after_the_timeout(on_the_loop):
    """A socket that accepts connections and never replies (a hung Redis): the timeout applies the policy."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)  # never accepted, never answered
    try:
        await assert_refused_within(f"redis://127.0.0.1:{hung.getsockname()[1]}/0", on_the_loop, 10)
    finally:
        hung.close()


async def assert_refused_within(url: str, on_the_loop: bool, seconds: float) -> None:
    """A limiter on `url` with a 0.3 s timeout and the refuse policy answers 503 within `seconds`."""
    import asyncio
    import time

    limiter = RateLimiter(url, "refuse", 0.3)
    started = time.monotonic()
    with pytest.raises(GatewayError) as err:
        if on_the_loop:
            await limiter.acquire_async(owner(rpm=5), owner(), 1)
        else:
            await asyncio.to_thread(limiter.acquire, owner(rpm=5), owner(), 1)
    assert err.value.status == 503 and time.monotonic() - started < seconds


def test_a_denial_names_the_bucket_that_refused_it_and_an_admission_names_none(limiter):
    key, org = owner(rpm=100, tpm=500), owner()
    admitted = limiter.acquire(key, org, 300)
    assert admitted.allowed and admitted.denied_kind is None
    refused = limiter.acquire(key, org, 300)  # the key's tokens bucket refuses: its requests bucket has room
    assert (refused.allowed, refused.denied_kind) == (False, "tokens")
    assert rate_limit_error(refused).message.startswith("Rate limit reached for tokens per minute.")


def test_a_release_refunds_the_unused_tokens_and_never_charges_more(limiter, caplog):
    """The refund is the hold less what was used: one token, all of it (nothing used), and nothing when more
    was used than held (never a further charge); no Redis error on the way (an organization without a
    concurrency cap: no slot to give back)."""
    org = owner()

    def remaining_after(used: int) -> str:
        key = owner(tpm=500)
        limiter.release(limiter.acquire(key, org, 300), used_tokens=used)
        return limiter.acquire(key, org, 1).headers["x-ratelimit-remaining-tokens"]

    assert [remaining_after(used) for used in (299, 0, 400)] == ["200", "499", "199"]
    assert "could not release" not in caplog.text


def test_a_concurrency_slot_is_given_back_when_there_is_no_refund(limiter):
    key, org = owner(), owner(concurrent=1)
    held = limiter.acquire(key, org, 10)
    limiter.release(held, used_tokens=10)  # every held token used: nothing to refund, the slot still returns
    assert limiter.acquire(key, org, 10).allowed


def test_on_a_tie_the_first_bucket_is_the_one_reported(limiter):
    """The headers report the tightest bucket of each kind; of two with as many tokens left, the first
    (the key's before its organization's)."""
    org = SimpleNamespace(**{**vars(owner()), "tokens_per_minute": 1000})
    assert limiter.acquire(owner(), org, 500).allowed  # another key of the organization used half of it
    tied = limiter.acquire(owner(tpm=500), org, 100)  # 400 left in both
    assert (tied.headers["x-ratelimit-limit-tokens"], tied.headers["x-ratelimit-remaining-tokens"]) == ("500", "400")


def test_a_local_slot_released_after_it_was_swept_or_never_taken_is_no_error():
    local = LocalLimiter()
    assert local.acquire([], "slots", 1, "crashed", 0)[0] == 1  # expires at once: a crashed request's slot
    assert local.acquire([], "slots", 1, "live", 60_000)[0] == 1  # sweeps it
    local.release("slots", "crashed")  # the crashed request comes back late
    local.release("never-seen", "slot")  # a key this process never saw (reset meanwhile)
    assert local.acquire([], "slots", 1, "next", 60_000)[0] == 0  # the live slot still counts
    local.release("slots", "live")
    assert local.acquire([], "slots", 1, "next", 60_000)[0] == 1


async def test_a_release_redis_cannot_take_on_the_event_loop_is_logged_not_raised(redis_clean, caplog):
    import asyncio

    import redis.asyncio as aioredis

    limiter = RateLimiter(REDIS_URL, "refuse", 0.5)
    decision = await limiter.acquire_async(owner(tpm=100), owner(concurrent=2), 50)
    keys = [k for k, _ in decision.token_buckets] + [decision.concurrency_key]
    acquire, _, extend = limiter._async_scripts()
    gone = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2,
                                   socket_connect_timeout=0.2).register_script("return 1")
    limiter._async = (asyncio.get_running_loop(), (acquire, gone, extend))
    await limiter.release_async(decision, used_tokens=10)
    warned = caplog.records[-1].getMessage()
    assert warned.startswith(f"rate limiter: could not release {keys} in Redis: ")
    assert decision.concurrency_key is None


@pytest.mark.parametrize("on_the_loop", [False, True])
async def test_a_redis_that_connects_then_never_answers_a_command_counts_as_unreachable(on_the_loop):
    """A server that completes the client's connection handshake (answers CLIENT SETINFO) and then hangs on
    the script: the read timeout, not the connect timeout, applies the policy."""
    import asyncio

    async def handshake_only(reader, writer):
        try:
            while data := await reader.read(65536):
                replies = data.count(b"SETINFO") + data.count(b"HELLO")
                if replies:
                    writer.write(b"+OK\r\n" * replies)
                    await writer.drain()
        except ConnectionError:
            pass

    server = await asyncio.start_server(handshake_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        await assert_refused_within(f"redis://127.0.0.1:{port}/0", on_the_loop, 3)  # 0.3 s, not a 5 s default
    finally:
        server.close()
