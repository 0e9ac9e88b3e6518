"""Replica choice. Per process (catalog.pick, the fallback without Redis): fewest requests in flight per unit of
weight, higher weight on ties; disabled deployments never loaded, unhealthy and benched ones skipped. Shared by
every gateway process (inference/routing.py, on the real Redis): prefix affinity with bounded loads, the
engines' reported queues, round robin, draining replicas avoided, a dead gateway's slots expiring."""

from __future__ import annotations

import asyncio
import math

import pytest

from inference import routing
from inference.catalog import Catalog
from inference.models import AIModel, Deployment
from inference.validation import parse_chat

pytestmark = pytest.mark.django_db


@pytest.fixture
def replicas():
    model = AIModel.objects.create(name="replicas")
    heavy = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9001", weight=2)
    light = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9002", weight=1)
    disabled = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9003", weight=5, enabled=False)
    sick = Deployment.objects.create(model=model, base_url="http://127.0.0.1:9004", weight=5, healthy=False)
    return heavy.pk, light.pk, disabled.pk, sick.pk


def test_fewest_in_flight_per_weight_then_the_heavier_replica(replicas):
    heavy, light, disabled, sick = replicas
    catalog = Catalog()
    entry = catalog.entries()["replicas"]
    assert sorted(u.id for u in entry.upstreams) == sorted([heavy, light, sick])  # the disabled one is not loaded
    picks = []
    for _ in range(6):
        upstream = catalog.pick(entry)
        catalog.started(upstream)
        picks.append(upstream.id)
    # in flight / weight: 0 vs 0 (weight decides), .5 vs 0, .5 vs 1, 1 vs 1 (weight), 1.5 vs 1, 1.5 vs 2
    assert picks == [heavy, light, heavy, heavy, light, heavy]
    assert sick not in picks
    for _ in range(3):
        catalog.finished(next(u for u in entry.upstreams if u.id == heavy))
    assert catalog.in_flight[heavy] == 1 and catalog.pick(entry).id == heavy  # .5 vs 2


def test_benched_and_unhealthy_replicas_are_skipped(replicas):
    heavy, light, disabled, sick = replicas
    catalog = Catalog()
    entry = catalog.entries()["replicas"]
    catalog.bench(next(u for u in entry.upstreams if u.id == heavy))
    assert catalog.pick(entry).id == light
    catalog.bench(next(u for u in entry.upstreams if u.id == light))
    assert catalog.pick(entry) is None  # the only one left is unhealthy


# -- the shared router (inference/routing.py), on the test run's Redis --------------------------------

@pytest.fixture
def router_entry(replicas, settings):
    """Two enabled, healthy replicas of weight 1 (the heavy one made light), one draining; fresh Redis keys."""
    import redis

    heavy, light, disabled, sick = replicas
    Deployment.objects.filter(pk=heavy).update(weight=1)
    Deployment.objects.filter(pk=sick).update(healthy=True, draining=True)
    client = redis.Redis.from_url(settings.REDIS_URL)
    for key in client.scan_iter(match=f"{routing.PREFIX}*"):
        client.delete(key)
    yield Catalog().entries()["replicas"], client
    client.close()


async def chosen(router, entry, key, slot, **kwargs):
    upstream = await router.choose(entry, key, slot, **kwargs)
    await asyncio.gather(*routing._polls)  # the load poll it may have started (nothing to poll here)
    return upstream


async def test_affinity_keeps_a_prefix_on_one_replica_and_tenants_apart(router_entry, settings):
    entry, client = router_entry
    router = routing.Router(settings.REDIS_URL, 1.0)
    inference = parse_chat({"model": "replicas", "messages": [{"role": "system", "content": "You are terse. " * 20},
                                                               {"role": "user", "content": "Hi"}]})
    key = routing.affinity_key(inference, "salt-of-acme")
    assert key != routing.affinity_key(inference, "salt-of-globex")  # same prompt, other tenant: another key
    first = [(await chosen(router, entry, key, f"r{i}")).id for i in range(1)]
    for i in range(5):  # one at a time (each finishes): always the replica that holds the prefix
        upstream = await chosen(router, entry, key, f"s{i}")
        assert upstream.id == first[0]
        await router.release(upstream, f"s{i}")
    owners = [(await chosen(router, entry, f"key-{i}", f"k{i}")).id for i in range(40)]
    assert not any(u.draining and u.id in owners for u in entry.upstreams)  # the draining one never
    homes = [client.zcard(f"{routing.PREFIX}keys:{u}") for u in set(owners)]
    assert len(homes) == 2 and abs(homes[0] - homes[1]) <= 1  # new keys' homes spread evenly (key factor 1)


async def test_bounded_loads_spill_a_hot_prefix_and_keep_every_replica_within_the_factor(router_entry, settings):
    entry, client = router_entry
    settings.GATEWAY_AFFINITY_LOAD_FACTOR = 1.25
    router = routing.Router(settings.REDIS_URL, 1.0)
    picks = [(await chosen(router, entry, "one-hot-prefix", f"h{i}")).id for i in range(20)]
    loads = sorted(picks.count(u) for u in set(picks))
    assert len(loads) == 2 and loads[1] <= math.ceil(1.25 * 20 / 2)  # capped at c times the mean
    assert picks[:2] == [picks[0]] * 2 and picks[2] != picks[0]  # the owner until full, then the next one
    assert int(client.get(f"{routing.PREFIX}home:one-hot-prefix")) == picks[0]  # lent, never re-homed
    members = sum(client.zcard(routing.inflight_key(u)) for u in set(picks))
    assert members == 20  # every request holds its slot until released


async def test_gateway_processes_see_each_others_requests_and_the_engines_reported_queue(router_entry, settings):
    entry, client = router_entry
    settings.GATEWAY_ROUTING = "least_loaded"
    one, two = routing.Router(settings.REDIS_URL, 1.0), routing.Router(settings.REDIS_URL, 1.0)  # two processes
    a = await chosen(one, entry, None, "p1")
    b = await chosen(two, entry, None, "p2")
    assert a.id != b.id  # the second process saw the first one's request
    await one.release(a, "p1")
    client.set(routing.load_key(a.id), 7)  # the engine reports a queue of its own (other clients)
    assert (await chosen(two, entry, None, "p3")).id == b.id


async def test_round_robin_alternates_and_slots_of_a_lost_gateway_age_out(router_entry, settings):
    entry, client = router_entry
    settings.GATEWAY_ROUTING = "round_robin"
    settings.GATEWAY_RESERVATION_TTL_SECONDS = 1
    router = routing.Router(settings.REDIS_URL, 1.0)
    picks = [(await chosen(router, entry, "k", f"rr{i}")).id for i in range(4)]
    assert picks[0] != picks[1] and picks[:2] == picks[2:]
    await asyncio.sleep(1.1)  # nobody released them (a gateway that died): they expire
    settings.GATEWAY_ROUTING = "least_loaded"
    await chosen(router, entry, None, "after")
    assert sum(client.zcard(routing.inflight_key(u)) for u in set(picks)) == 1


async def test_a_single_replica_is_chosen_without_redis_and_a_slot_is_released_once(router_entry, settings):
    """One available replica leaves nothing to choose: no slot in Redis (no round trip to take or release
    it); with two, the slot is taken, and released by the process that took it, once."""
    entry, client = router_entry
    settings.GATEWAY_ROUTING = "least_loaded"
    router = routing.Router(settings.REDIS_URL, 1.0)
    both = await chosen(router, entry, None, "two")
    assert client.zcard(routing.inflight_key(both.id)) == 1
    await routing.Router(settings.REDIS_URL, 1.0).release(both, "two")  # another process never took it
    assert client.zcard(routing.inflight_key(both.id)) == 1
    await router.release(both, "two")
    assert client.zcard(routing.inflight_key(both.id)) == 0
    routing.catalog.bench(both)  # this process cannot reach it for a while: one replica left
    try:
        alone = await chosen(router, entry, None, "one")
    finally:
        routing.catalog.benched_until.pop(both.id, None)
    assert alone.id != both.id and client.zcard(routing.inflight_key(alone.id)) == 0
    await router.release(alone, "one")
    assert not any(client.zcard(routing.inflight_key(u.id)) for u in entry.upstreams)
